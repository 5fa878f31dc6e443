"""Byte-reproducible copies of HDF5 files (ITK ``.h5`` transforms).

HDF5 stores an access/modification/change/birth time in the header of every object it creates
(``H5Pset_obj_track_times``, on by default, as in ITK's transform writer), so two runs that
compute identical transforms write different bytes. ``copy_without_times`` rewrites a file with
the same groups, datasets (values, dtypes, shapes, chunking, compression, filters) and attributes
but no object times, in the oldest file format: the bytes then depend on the content only.
"""

from __future__ import annotations

from pathlib import Path


def _gcpl():
    import h5py

    plist = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    plist.set_obj_track_times(False)
    return plist


def _copy_attrs(src, dst) -> None:
    for key in sorted(src.attrs):
        dst.attrs[key] = src.attrs[key]


def _copy_group(src, dst) -> None:
    import h5py

    _copy_attrs(src, dst)
    for name in src:  # h5py iterates names in HDF5's (alphanumeric) order: deterministic
        item = src.get(name, getlink=True)
        if not isinstance(item, h5py.HardLink):
            raise ValueError(f"{src.file.filename}: {src.name}/{name} is a link; not supported")
        obj = src[name]
        if isinstance(obj, h5py.Group):
            gid = h5py.h5g.create(dst.id, name.encode(), gcpl=_gcpl())
            _copy_group(obj, h5py.Group(gid))
        else:
            out = dst.create_dataset(name, data=obj[()], dtype=obj.dtype, shape=obj.shape, chunks=obj.chunks,
                                     compression=obj.compression, compression_opts=obj.compression_opts,
                                     shuffle=obj.shuffle, fletcher32=obj.fletcher32, track_times=False)
            _copy_attrs(obj, out)


def copy_without_times(src, dst) -> Path:
    """Copy the HDF5 file ``src`` to ``dst`` without object times (see the module docstring)."""
    import h5py

    with h5py.File(src, "r") as fin, h5py.File(dst, "w", libver="earliest", track_order=False) as fout:
        _copy_group(fin, fout)
    return Path(dst)
