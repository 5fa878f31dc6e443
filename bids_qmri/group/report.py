"""Group report: ``OUTPUT_DIR/group/report.html`` with PNG figures in ``group/figures/``.

Offline and self-contained (no scripts or styles from the network); figures are referenced
by relative path so the folder can be copied as a whole.
"""

from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display on clusters / in containers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .. import __version__  # noqa: E402
from ..utils.atomic import atomic_path, write_text_atomic  # noqa: E402
from . import tables  # noqa: E402

# Fewer participants than this: the clustered-bootstrap CI is flagged as unreliable
# (measured coverage of the percentile interval drops below nominal for small cohorts).
MIN_PARTICIPANTS_FOR_CI = 10


def _safe(*parts) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9-]+", "", str(p)) for p in parts if str(p) != "n/a")


def _save(fig, path: Path, dpi: int = 100) -> Path:
    # Constrained layout instead of bbox_inches="tight", which renders a figure twice.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def _label(suffix, acq, units="") -> str:
    s = suffix if acq == "n/a" else f"{suffix} (acq-{acq})"
    return f"{s} [{units}]" if units and units != "n/a" else s


def _versus(row) -> str:
    """``a vs b`` for a pair of one acquisition, ``a (acq-X) vs b (acq-Y)`` across acquisitions."""
    if row["acq"] == row["acq_b"]:
        return f"{row['method_a']} vs {row['method_b']}"
    return f"{row['method_a']} (acq-{row['acq']}) vs {row['method_b']} (acq-{row['acq_b']})"


def agreement_figure(df: pd.DataFrame, row: pd.Series, path: Path) -> Path:
    """Scatter (identity line) and Bland–Altman plot of one method pair."""
    p = tables.paired_values(df, row["atlas"], row["suffix"], row["acq"], row["method_a"],
                             row["method_b"], row["acq_b"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5), layout="constrained")
    few = p["participant_id"].nunique() <= 12
    if few:  # a colour per participant, with a legend
        for pid, g in p.groupby("participant_id"):
            ax1.scatter(g["x"], g["y"], s=12, alpha=0.7, label=pid)
            ax2.scatter((g["x"] + g["y"]) / 2, g["x"] - g["y"], s=12, alpha=0.7)
    else:  # one artist per panel: fast for large cohorts
        ax1.scatter(p["x"], p["y"], s=6, alpha=0.5)
        ax2.scatter((p["x"] + p["y"]) / 2, p["x"] - p["y"], s=6, alpha=0.5)
    lo = float(np.nanmin(p[["x", "y"]].to_numpy()))
    hi = float(np.nanmax(p[["x", "y"]].to_numpy()))
    ax1.plot([lo, hi], [lo, hi], "k--", lw=1, label="identity")
    what = _label(row["suffix"], row["acq"], row["units"])
    ax1.set_xlabel(f"{row['method_a']} {what}")
    ax1.set_ylabel(f"{row['method_b']} {_label(row['suffix'], row['acq_b'], row['units'])}")
    ci = (f"[{row['ccc_ci_low']:.3f}, {row['ccc_ci_high']:.3f}]"
          if np.isfinite(row["ccc_ci_low"]) else "(no CI)")
    ax1.set_title(f"CCC {row['ccc']:.3f} {ci}")
    if few:
        ax1.legend(fontsize=7, loc="best")
    ax2.axhline(row["mean_diff"], color="k", lw=1)
    for v in (row["loa_low"], row["loa_high"]):
        ax2.axhline(v, color="k", lw=1, ls="--")
    ax2.set_xlabel(f"mean of {row['method_a']} and {row['method_b']}")
    ax2.set_ylabel(f"{row['method_a']} − {row['method_b']}")
    ax2.set_title(f"Bland–Altman: {row['mean_diff']:.3g} "
                  f"(LoA {row['loa_low']:.3g}, {row['loa_high']:.3g})")
    versus = _versus(row)
    fig.suptitle(f"atlas-{row['atlas']}: {versus}, {row['suffix']}")
    return _save(fig, path)


def regional_boxplot(pp: pd.DataFrame, atlas, suffix, acq, path: Path) -> Path:
    """Per region, the distribution across participants of the regional mean, per method."""
    sub = pp[(pp["atlas"] == atlas) & (pp["suffix"] == suffix) & (pp["acq"] == acq)]
    methods = sorted(sub["method"].unique(), key=tables._method_key)
    regions = sub[["region_index", "region"]].drop_duplicates("region_index")
    regions = regions.sort_values("region_index")
    row_of = {r: i for i, r in enumerate(regions["region_index"])}
    values = {k: g.to_numpy() for k, g in sub.groupby(["method", "region_index"])["mean"]}
    n_r, n_m = len(regions), len(methods)
    height = min(60.0, max(3.0, 0.16 * n_r * max(n_m, 2) + 1.0))
    fig, ax = plt.subplots(figsize=(8, height), layout="constrained")
    width = 0.8 / n_m
    for j, m in enumerate(methods):
        keys = [(m, r) for r in regions["region_index"] if (m, r) in values]
        if not keys:
            continue
        pos = [row_of[r] + (j - (n_m - 1) / 2) * width for _, r in keys]
        color = f"C{j}"
        ax.boxplot([values[k] for k in keys], positions=pos, widths=width * 0.9, vert=False,
                   patch_artist=True, manage_ticks=False, flierprops={"markersize": 2},
                   boxprops={"facecolor": color, "alpha": 0.6})
        ax.plot([], [], color=color, lw=6, alpha=0.6, label=m)
    ax.set_yticks(range(n_r))
    ax.set_yticklabels(regions["region"], fontsize=7)
    ax.set_ylim(n_r - 0.5, -0.5)  # first region on top
    units = ",".join(sorted(set(sub["units"])))
    ax.set_xlabel(_label(suffix, acq, units))
    ax.set_title(f"atlas-{atlas}: regional mean across participants")
    ax.legend(fontsize=8, loc="best")
    # Tall figures (large atlases × many methods) at a lower resolution keep the PNG light.
    return _save(fig, path, dpi=100 if height <= 20 else 72)


def repeatability_figure(cv: pd.DataFrame, atlas, suffix, acq, path: Path) -> Path:
    """Distribution of the within-subject CV (seed 004 Eq. 8) over participants × regions."""
    sub = cv[(cv["atlas"] == atlas) & (cv["suffix"] == suffix) & (cv["acq"] == acq)]
    methods = sorted(sub["method"].unique(), key=tables._method_key)
    data = [sub[sub["method"] == m]["cv_percent"].dropna().to_numpy() for m in methods]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(methods) + 2), 4.2), layout="constrained")
    ax.boxplot(data, showfliers=False)  # every point is drawn below
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    for j, v in enumerate(data, start=1):
        ax.scatter(j + rng.uniform(-0.15, 0.15, v.size), v, s=6, alpha=0.5, color=f"C{j - 1}")
    ax.set_xticks(range(1, len(methods) + 1))
    ax.set_xticklabels(methods)
    ax.set_ylabel("within-subject CV [%]")
    ax.set_title(f"atlas-{atlas}: repeatability of {_label(suffix, acq)}\n"
                 "(each point: one participant × region)", fontsize=10)
    return _save(fig, path)


def _html_table(df: pd.DataFrame, floatfmt="{:.4g}") -> str:
    if df is None or df.empty:
        return "<p><em>none</em></p>"
    return df.to_html(index=False, na_rep="n/a", float_format=floatfmt.format, border=0,
                      classes="tbl", escape=True)


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("bids_qmri.group", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )


def _per_map(frame: pd.DataFrame, atlas, kind: str, draw, fig_dir: Path, items: list
             ) -> list[Path]:
    """One ``draw(frame, atlas, suffix, acq, path)`` figure per map (suffix, acq) of ``frame``;
    appends the report entries to ``items``."""
    paths = []
    for (suffix, acq), _ in frame.groupby(["suffix", "acq"], sort=True):
        name = _safe("atlas-" + atlas, suffix, "acq-" + acq) + f"_{kind}.png"
        paths.append(draw(frame, atlas, suffix, acq, fig_dir / name))
        items.append({"title": f"atlas-{atlas} {_label(suffix, acq)}", "figure": f"figures/{name}"})
    return paths


def write_report(group_dir, *, collection, summaries: dict, agreement: pd.DataFrame,
                 repeatability: dict, config) -> list[Path]:
    """Draw the figures and render ``report.html``; returns every path written."""
    group_dir = Path(group_dir)
    fig_dir = group_dir / "figures"
    written: list[Path] = []

    agreement_items = []
    for _, row in agreement.iterrows():
        b = row["method_b"] if row["acq"] == row["acq_b"] else f"{row['method_b']}-acq-{row['acq_b']}"
        name = _safe("atlas-" + row["atlas"], row["suffix"], "acq-" + row["acq"],
                     f"{row['method_a']}-vs-{b}") + "_agreement.png"
        df = collection.tables[row["atlas"]]
        written.append(agreement_figure(df, row, fig_dir / name))
        title = (f"{_label(row['suffix'], row['acq'])}: {_versus(row)}" if row["acq"] == row["acq_b"]
                 else f"{row['suffix']}: {_versus(row)}")
        agreement_items.append({"title": f"atlas-{row['atlas']} {title}",
                                "figure": f"figures/{name}"})

    box_items, rep_items = [], []
    for atlas, df in sorted(collection.tables.items()):
        written += _per_map(tables.per_participant(df), atlas, "regions", regional_boxplot,
                            fig_dir, box_items)
        if atlas in repeatability:
            written += _per_map(tables.participant_cv(df), atlas, "repeatability",
                                repeatability_figure, fig_dir, rep_items)

    # Figures of an earlier run that this run did not draw would be misleading: remove them.
    keep = {p.resolve() for p in written}
    if fig_dir.is_dir():
        for old in fig_dir.glob("*.png"):
            if old.resolve() not in keep:
                old.unlink()

    status = collection.status_frame()
    n_ok = len(collection.participants("ok"))
    small = (not agreement.empty
             and int(agreement["n_participants"].min()) < MIN_PARTICIPANTS_FOR_CI)
    context = {
        "version": __version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "output_dir": str(config.output_dir),
        "n_bootstrap": config.n_bootstrap,
        "seed": config.seed,
        "included": collection.participants("ok"),
        "missing": collection.participants("missing"),
        "failed": collection.participants("failed"),
        "n_included": n_ok,
        "status_table": _html_table(status),
        "agreement_table": _html_table(agreement.drop(columns=["ci_method"])),
        "agreement_items": agreement_items,
        "small_cohort": small,
        "min_participants_ci": MIN_PARTICIPANTS_FOR_CI,
        "box_items": box_items,
        "rep_items": rep_items,
        "repeatability_tables": {a: _html_table(t) for a, t in sorted(repeatability.items())},
        "summary_tables": {a: _html_table(t) for a, t in sorted(summaries.items())},
    }
    html = _env().get_template("report.html.j2").render(**context)
    written.append(write_text_atomic(group_dir / "report.html", html))
    return written
