"""Pictures people would rather look at than read: sample grids and per-concept bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """NCHW in [0, 1] -> NHWC uint8."""
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def image_grid(images: torch.Tensor, ncol: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images into one picture, `ncol` per row, with a thin white border."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    nrow = -(-n // ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(arr):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    img = Image.fromarray(grid)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST) if scale > 1 else img


def save_png(images: torch.Tensor, path: str | Path, ncol: int | None = None, scale: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncol = ncol or min(8, len(images))
    image_grid(images, ncol, scale=scale).save(path)
    return path


def labelled_grids(
    images: torch.Tensor,
    blocks: Sequence[str],
    rows: Sequence[str],
    cols: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """One panel per block (e.g. texture), each a rows x cols grid (e.g. object x colour)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = len(rows) * len(cols)
    ncols = min(4, len(blocks))
    nrows = -(-len(blocks) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.4 * nrows), squeeze=False)
    for b, ax in enumerate(axes.flat):
        ax.axis("off")
        if b >= len(blocks):
            continue
        ax.imshow(image_grid(images[b * per : (b + 1) * per], len(cols)))
        ax.set_title(blocks[b], fontsize=11)
        ax.axis("on")
        ax.set_xticks([(i + 0.5) * 33 for i in range(len(cols))], cols, rotation=90, fontsize=7)
        ax.set_yticks([(i + 0.5) * 33 for i in range(len(rows))], rows, fontsize=7)
        ax.tick_params(length=0)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def probe_rows(names) -> dict[str, list[str]]:
    """Probe sample names (`PROBE:CONCEPT`, the probe itself may hold a colon: `synonym:hoop:ring`)
    grouped by concept, in order."""
    rows: dict[str, list[str]] = {}
    for name in names:
        rows.setdefault(name.rsplit(":", 1)[-1], []).append(name)
    return rows


def probe_grid(samples: dict[str, torch.Tensor], figures: dict[str, str], path: str | Path, title: str = "") -> Path:
    """Robustness probes (`cul.probes`, sample names `PROBE:CONCEPT`) as a matrix: one row per
    concept, one panel per probe with its first images, titled with the probe and its figure
    (`figures[name]`, e.g. "6% (1/16; base 16/16)"). A figure that
    says so when no probe ran, so the step's declared plot always exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not samples:
        fig, ax = plt.subplots(figsize=(3.2, 1.0))
        ax.axis("off")
        ax.text(0.5, 0.5, "no robustness probe ran for this step", ha="center", va="center", fontsize=8)
        return _save(fig, path)
    rows = probe_rows(samples)
    ncols = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), ncols, figsize=(1.25 * ncols + 0.9, 1.45 * len(rows) + 0.5), squeeze=False)
    for r, (concept, names) in enumerate(rows.items()):
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(names):
                ax.axis("off")
                continue
            images = samples[names[c]]
            ax.imshow(image_grid(images, max(1, -(-len(images) // 2))))
            probe = names[c][: -len(concept) - 1]
            ax.set_title(f"{probe[:22]}\n{figures.get(names[c], '')}", fontsize=6)
        axes[r, 0].set_ylabel(concept, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scene_grid(images: torch.Tensor, path: str | Path, title: str) -> Path:
    """All 512 scenes (in `world.all_scenes()` order: object, colour, texture) as one panel per
    texture, rows objects, columns colours."""
    from cul.world import vocabulary

    names = vocabulary()
    n_o, n_c, n_t = len(names["object"]), len(names["colour"]), len(names["texture"])
    by_texture = images.reshape(n_o, n_c, n_t, *images.shape[1:]).permute(2, 0, 1, 3, 4, 5)
    return labelled_grids(
        by_texture.reshape(-1, *images.shape[1:]), names["texture"], names["object"], names["colour"], path, title
    )


def concept_bars(per_concept: dict[str, float], path: str | Path, title: str, threshold: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(per_concept)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(names, [100 * per_concept[n] for n in names], color="tab:blue")
    if threshold is not None:
        ax.axhline(100 * threshold, color="tab:red", ls="--", lw=1)
    ax.set_ylabel("judged correct (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=70, labelsize=8)
    return _save(fig, path)


BENCH_METRICS = (
    ("ua", "UA (%)", 100),
    ("ra_in", "RA-I (%)", 100),
    ("ra_cross", "RA-C (%)", 100),
    ("ra_neighbour", "RA-N (%)", 100),
    ("fd_ratio", "FD / base FD", 1),
    ("drift", "||theta - theta_0||", 1),
    ("seconds", "seconds per request (replay + training)", 1),
    ("ra_all", "all retained concepts (%)", 100),
)


def metric_curves(runs: dict[str, list[dict]], path: str | Path, title: str = "") -> Path:
    """Each metric against the request step, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    # more methods than colours: line styles too, so no two methods look alike
    styles = [
        dict(color=run_colour(i), linestyle=("-", "--", ":")[i // 20 % 3], marker="os^D"[i % 4])
        for i in range(len(runs))
    ]
    for ax, (key, label, scale) in zip(axes.flat, BENCH_METRICS):
        for style, (name, results) in zip(styles, runs.items()):
            pts = [(r["step"], r[key] * scale) for r in results if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), ms=3, label=name, **style)
        if key == "fd_ratio":  # collapsing methods reach 100x; the targets live near 1x
            ax.set_yscale("log")
            ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xlabel("request")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def run_colour(i: int) -> tuple[float, float, float]:
    """Run i's colour in a figure: the 20-colour map's dark shades (matplotlib's ten default colours)
    for the first ten runs, its light shades for the next ten, so no two of up to 20 runs share one."""
    from matplotlib import colormaps

    return colormaps["tab20"].colors[(2 * i + i // 10) % 20]  # type: ignore[attr-defined]  # a ListedColormap


def run_labels(records: dict[str, dict]) -> dict[str, str]:
    """Legend labels of `robustness_bars`: each run's mean bar, naming how many requests it ran
    when the runs differ in length (a run stopped early is not compared as if it had gone on)."""
    lengths = {record.get("steps") for record in records.values()}
    after = (lambda r: f", after {r.get('steps')}") if len(lengths) > 1 else (lambda r: "")
    return {label: f"{label} (mean{after(record)})" for label, record in records.items()}


def robustness_bars(
    records: dict[str, dict],
    path: str | Path,
    target: float = 0.05,
    title: str = "",
    runs: Sequence[str] = (),
) -> Path:
    """Recovery under each probe family (`cul.probes.FAMILIES`), one bar group per family and one
    bar per run: the bar is the mean over the family's probes of every forgotten concept (those the
    base model reads, `cul.probes.summarise`), the dot the worst probe.
    `records` maps a run's label to its `robustness.json`; the dashed line is `target`. `runs`: the
    labels in `metric_curves`' order, so a run has the same colour in both figures (a run not
    among them takes a colour after theirs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cul.probes import FAMILIES

    width = 0.8 / max(1, len(records))
    fig, ax = plt.subplots(figsize=(2.0 * len(FAMILIES) + 1.5, 3.8))
    names = run_labels(records)
    for i, (label, record) in enumerate(records.items()):
        xs, means, worsts = [], [], []
        for j, fam in enumerate(FAMILIES):
            s = record["summary"].get(fam)
            if s:
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(100 * s["mean"])
                worsts.append(100 * s["worst"])
        colour = run_colour(list(runs).index(label) if label in runs else len(runs) + i)
        ax.bar(xs, means, width * 0.9, color=colour, label=names[label])
        ax.plot(xs, worsts, "o", color=colour, markeredgecolor="black", ms=5)
    ax.plot([], [], "o", color="white", markeredgecolor="black", label="worst probe")
    ax.axhline(100 * target, color="grey", ls="--", lw=1, label=f"target {100 * target:.0f}%")
    ax.set_xticks(range(len(FAMILIES)), [f.replace("_", " ") for f in FAMILIES])
    ax.set_ylabel("recovery (% of the base model's)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=10)
    return _save(fig, path)


def before_after(
    before: torch.Tensor, after: torch.Tensor, prompts: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """The same prompts and seeds through two models, one row per prompt: what a step changed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(prompts)
    fig, axes = plt.subplots(n, 2, figsize=(4.0, 1.25 * n + 0.6), squeeze=False)
    for i, p in enumerate(prompts):
        for j, (imgs, head) in enumerate(((before, "before"), (after, "after"))):
            ax = axes[i, j]
            ax.imshow(to_uint8(imgs[i : i + 1])[0], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(head, fontsize=9)
        axes[i, 0].set_ylabel(p.replace("a ", "", 1)[:28], fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
