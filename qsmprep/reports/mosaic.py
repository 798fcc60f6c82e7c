"""Slice mosaics of volumes as PNG figures, for the per-subject report.

Pure plotting on arrays (matplotlib, Agg backend); the caller reads files.
"""

import io

import numpy as np

# Display windows: what a neuroradiologist expects to see for each map.
CHI_WINDOW_PPM = (-0.15, 0.15)
LOCAL_FIELD_WINDOW_PPM = (-0.05, 0.05)


def pyplot_agg():
    """matplotlib.pyplot on the headless Agg backend (imported on first use, not at import time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig, **savefig):
    """Render ``fig`` to PNG bytes at 90 dpi and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, **savefig)
    pyplot_agg().close(fig)
    return buffer.getvalue()


def slice_indices(mask, n_slices=8, axis=2):
    """``n_slices`` evenly spaced slice indices along ``axis`` through the mask's extent."""
    m = np.asarray(mask) > 0
    other = tuple(a for a in range(m.ndim) if a != axis)
    occupied = np.flatnonzero(m.any(axis=other)) if m.any() else np.arange(m.shape[axis])
    lo, hi = occupied[0], occupied[-1]
    # skip the outermost 10% where the brain is only a sliver
    margin = int(0.1 * (hi - lo))
    return np.unique(np.linspace(lo + margin, hi - margin, n_slices).round().astype(int))


def in_plane_box(mask, axis=2, margin=0.15):
    """In-plane crop (two slices, for the axes other than ``axis``) around the mask, for ``mosaic_png``.

    The mask's bounding box across all slices, grown on each side by ``margin`` (default 0.15) of its
    extent (about 20-25 mm around an adult brain: the scalp shows, so a mask that misses brain does too)
    and by at least 2 voxels, and clipped to the grid. The whole plane for an empty mask.
    """
    m = np.asarray(mask) > 0
    if not m.any():
        return tuple(slice(0, n) for a, n in enumerate(m.shape) if a != axis)
    box = []
    for a, n in enumerate(m.shape):
        if a == axis:
            continue
        occupied = np.flatnonzero(m.any(axis=tuple(b for b in range(m.ndim) if b != a)))
        lo, hi = occupied[0], occupied[-1] + 1
        grow = max(int(round(margin * (hi - lo))), 2)  # a thin mask still gets panels a contour can be drawn in
        box.append(slice(int(max(lo - grow, 0)), int(min(hi + grow, n))))
    return tuple(box)


def robust_window(volume, mask, percentiles=(2, 98)):
    """Symmetric display window (-h, h) in ``volume``'s units, h the larger magnitude of its ``percentiles``
    (default the 2nd and 98th) inside ``mask``; (-1, 1) for an empty mask."""
    values = np.asarray(volume)[np.asarray(mask) > 0]
    if values.size == 0:
        return (-1.0, 1.0)
    lo, hi = np.percentile(values, percentiles)
    half = max(abs(lo), abs(hi), 1e-6)
    return (-half, half)


def mosaic_png(volume, slices, axis=2, window=None, cmap="gray", outline=None, title="", units="",
               side_labels=None, columns=None, crop=None, voxel_size=None):
    """Render slices of ``volume`` in rows of ``columns`` panels; return PNG bytes.

    Parameters
    ----------
    volume : 3D array
        The image, shown in array orientation: the first array axis runs
        left to right in each slice, the second bottom to top (with
        ``to_ras`` first, an axial slice in neurological convention).
    slices : sequence of int
        Slice indices along ``axis``, shown left to right, then row by row.
    axis : int, default 2
        Slicing axis (2 = axial for an axial acquisition).
    window : (float, float) or None
        Display range; None uses the 1-99th percentile of the volume.
    cmap : str, default "gray"
        Matplotlib colour map.
    outline : 3D bool array or None
        Contour drawn in red on every slice (e.g. the brain mask).
    title, units : str
        Figure title and colour-bar label.
    side_labels : (str, str) or None, default None
        Text written at the left and right edges of the first slice, e.g.
        ("L", "R") for a volume in RAS+ order (``to_ras``) sliced axially.
    columns : int or None, default None
        Panels per row; None puts every slice in one row.
    crop : (slice, slice) or None, default None
        The part of each slice shown (``in_plane_box``), in the order of the
        axes other than ``axis``; None shows the whole slice.
    voxel_size : tuple of 3 float or None, default None
        Voxel size (mm) along the volume's axes, so that a slice of
        non-square voxels is drawn to scale; None draws square pixels.
    """
    plt = pyplot_agg()
    vol = np.asarray(volume, dtype=np.float32)
    if window is None:
        window = tuple(np.percentile(vol, (1, 99)))
    crop = crop or (slice(None), slice(None))
    panels = [np.take(vol, s, axis=axis)[crop].T for s in slices]
    columns = columns or len(panels)
    rows = -(-len(panels) // columns)
    across, up = (a for a in range(3) if a != axis)  # the axes drawn left to right and bottom to top
    aspect = 1.0 if voxel_size is None else voxel_size[up] / voxel_size[across]
    height, width = panels[0].shape
    panel_in = 1.6 if rows == 1 else 2.6  # one row: a strip; several: larger panels, for reading detail
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(panel_in * columns + 0.8, panel_in * rows * min(aspect * height / width, 1.5) + 0.4))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, s, img in zip(axes.flat, slices, panels):
        shown = ax.imshow(img, cmap=cmap, vmin=window[0], vmax=window[1], origin="lower", interpolation="nearest",
                          aspect=aspect)
        if outline is not None:
            ax.contour(np.take(outline, s, axis=axis)[crop].T.astype(float), levels=[0.5], colors="r",
                       linewidths=0.6)
    if side_labels:
        from matplotlib.patheffects import withStroke

        for x, text, align in ((0.02, side_labels[0], "left"), (0.98, side_labels[1], "right")):
            axes[0][0].text(x, 0.98, text, transform=axes[0][0].transAxes, ha=align, va="top", fontsize=8,
                            color="yellow", fontweight="bold",  # outlined: legible on dark and light maps alike
                            path_effects=[withStroke(linewidth=2, foreground="black")])
    fig.colorbar(shown, ax=axes, fraction=0.02, pad=0.01, label=units)
    fig.suptitle(title, fontsize=9)
    return png_bytes(fig)


def orthogonal_slices(volume, mask):
    """Axial, coronal and sagittal slices (axes 2, 1, 0) through the mask's centre of mass.

    The volume is demeaned in ``mask`` and set to 0 outside it, so maps compare
    as the scores do (``qsmprep.metrics``). Returns three 2D float32 arrays.
    """
    m = np.asarray(mask) > 0
    vol = np.asarray(volume, dtype=np.float32)
    vol = np.where(m, vol - vol[m].mean(), np.float32(0))
    centre = np.round(np.argwhere(m).mean(axis=0)).astype(int)
    return [np.take(vol, centre[axis], axis=axis) for axis in (2, 1, 0)]


def comparison_png(maps, mask, window=CHI_WINDOW_PPM, title="", units="ppm"):
    """Several maps of one subject, one row each, in three orientations (``orthogonal_slices``); PNG bytes.

    Parameters
    ----------
    maps : dict of str -> 3D array
        Row label (e.g. "COSMOS", "deep: NRMSE 60.7 %") -> map, all on the grid of ``mask``.
    mask : 3D array
        Region shown, demeaned in and zero outside.
    window : (float, float), default CHI_WINDOW_PPM
        Display range, in the maps' units.
    title, units : str
        Figure title and colour-bar label (default "ppm").
    """
    plt = pyplot_agg()
    # constrained layout keeps the title next to the first row (a fixed grid left it far above for many rows)
    fig, axes = plt.subplots(len(maps), 3, figsize=(6.0, 2.0 * len(maps) + 0.4), squeeze=False, layout="constrained")
    for row, (label, volume) in zip(axes, maps.items()):
        for ax, image in zip(row, orthogonal_slices(volume, mask)):
            shown = ax.imshow(image.T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                              interpolation="nearest")  # fmt: skip
            ax.set_axis_off()
        row[0].set_title(label, fontsize=8, loc="left")
    fig.colorbar(shown, ax=axes, fraction=0.03, pad=0.01, label=units)
    fig.suptitle(title, fontsize=9)
    return png_bytes(fig, bbox_inches="tight")
