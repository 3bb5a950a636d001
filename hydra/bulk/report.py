"""The dataset report of a bulk run (`inference.py --report NAME`): what the captions contain, and which images
are worth reviewing by hand.

`DatasetReport` is fed one image at a time (`add(path, probs, passing)`) and keeps only running sums per tag
and two small heaps, so its memory does not grow with the number of images (no per-image probability arrays):
- per tag: how many images got it and the sum of its (caption) probability over those images;
- the `keep` images with the fewest tags (the captions most likely to miss something);
- the `keep` images with the most borderline tags: probabilities within `margin` of the tag's threshold, on
  either side (the calls a person should check). Without thresholds (a top-k run) there are none.

`write(NAME)` writes three files, each atomically (`hydra.common.atomic_write`); a NAME ending in `.html` or
`.csv` has that suffix removed first, so `--report report`, `--report report.html` and `--report report.csv`
all write the same three files:
- `NAME.csv`: tag, category, count, percent of images, mean probability (over the images that got the tag),
  most frequent first; only tags that some image got;
- `NAME-review.csv`: the two review lists (list, file, tags, borderline, borderline tags with p/threshold);
- `NAME.html`: one self-contained page (no external files or fetches): a summary, a bar chart of the top tags
  (matplotlib, an embedded PNG), the top of the tag table, and the two review lists with thumbnails (small
  JPEG data URIs, at most `THUMB_SIDE` px a side), made when the page is written.
"""

from __future__ import annotations

import base64
import csv
import heapq
import html
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hydra.common import atomic_write
from hydra.tags.rules import TagSettings, category_names

KEEP = 24                 # images in each review list
BORDERLINE_MARGIN = 0.05  # |p - threshold| <= this (probability scale) counts as borderline
BORDERLINE_SHOWN = 8      # borderline tags named per image (the nearest to their thresholds)
CHART_TAGS = 30           # bars in the chart
TABLE_TAGS = 100          # rows of the tag table in the page (the CSV has them all)
THUMB_SIDE = 160          # thumbnail long edge, px
THUMB_QUALITY = 70        # thumbnail JPEG quality
# e621's category colours, so the chart reads like the site; other categories get matplotlib's cycle
CATEGORY_COLOURS = {"general": "#b4c7d9", "artist": "#f2ac08", "contributor": "#c0c0c0", "copyright": "#d0d",
                    "character": "#0a0", "species": "#ed5d1f", "invalid": "#ff3d3d", "meta": "#666",
                    "lore": "#282", "unassigned": "#999"}


@dataclass(frozen=True)
class ReviewItem:
    """One image in a review list."""

    path: str
    tags: int                                   # tags in its caption
    borderline: int                             # tags within the margin of their thresholds
    nearest: tuple[tuple[str, float, float], ...]  # (tag, p, threshold) of the nearest borderline tags


def report_paths(name: str) -> tuple[str, str, str]:
    """(tag table CSV, review CSV, HTML page) written for `--report name`."""
    base, ext = os.path.splitext(name)
    if ext.lower() not in (".html", ".htm", ".csv"):
        base = name
    return f"{base}.csv", f"{base}-review.csv", f"{base}.html"


class DatasetReport:
    """Running statistics of a run's captions (see the module docstring).

    Args:
        labels: the model's labels in model order (the names `passing` uses).
        categories: category name per label, or None when the model has none.
        thresholds: (T,) p-thresholds in model order (+inf = never passes), or None (top k: no borderline tags).
        excluded: (T,) bool of excluded tags (never borderline), or None.
        margin: the borderline margin on the probability scale.
        keep: images kept in each review list.
    """

    def __init__(self, labels: Sequence[str], categories: Sequence[str] | None = None,
                 thresholds: np.ndarray | None = None, excluded: np.ndarray | None = None, *,
                 margin: float = BORDERLINE_MARGIN, keep: int = KEEP):
        self.labels = list(labels)
        self.index = {t: i for i, t in enumerate(self.labels)}
        self.categories = list(categories) if categories is not None else None
        self.margin, self.keep = float(margin), int(keep)
        self.count = np.zeros(len(self.labels), dtype=np.int64)
        self.psum = np.zeros(len(self.labels), dtype=np.float64)
        self.images = 0
        self.thresholds = None
        if thresholds is not None:
            t = np.asarray(thresholds, dtype=np.float64)
            usable = np.isfinite(t) & (t <= 1.0)
            if excluded is not None:
                usable &= ~np.asarray(excluded, dtype=bool)
            self.thresholds = np.where(usable, t, np.nan)  # NaN: never borderline
        self.classify: Callable[[np.ndarray], Mapping[str, float]] | None = None
        self._seq = 0
        self._fewest: list[tuple] = []      # max-heap by (tags, order) via negation: heap[0] is evicted first
        self._borderline: list[tuple] = []  # min-heap by (borderline, -order): heap[0] is evicted first

    @classmethod
    def for_settings(cls, settings: TagSettings, **kwargs) -> DatasetReport:
        """A report of a run with these tag settings: its thresholds (none for a top-k run), categories (when
        it has tag metadata) and exclusions; `add` without `passing` classifies with the run's rules."""
        rules = settings.rules()
        categories = category_names(settings.labels, settings.metadata) if settings.metadata is not None else None
        report = cls(settings.labels, categories, None if rules.topk is not None else rules.thresholds,
                     rules.excluded, **kwargs)
        report.classify = rules.classify
        return report

    def add(self, path: str, probs: np.ndarray, passing: Mapping[str, float] | None = None) -> None:
        """One tagged image: its (T,) probabilities (NaN = not computed) and its caption's {tag: probability}
        (None: `self.classify(probs)`, the run's rules when made by `for_settings`)."""
        if passing is None:
            passing = self.classify(probs)
        idx = np.fromiter((self.index[t] for t in passing), dtype=np.int64, count=len(passing))
        self.count[idx] += 1
        self.psum[idx] += np.fromiter(passing.values(), dtype=np.float64, count=len(passing))
        self.images += 1
        self._seq += 1
        ntags = len(passing)
        nearest: tuple = ()
        border = 0
        if self.thresholds is not None:
            p = np.asarray(probs, dtype=np.float64)
            with np.errstate(invalid="ignore"):
                distance = np.abs(p - self.thresholds)  # NaN for uncomputed or unusable tags
                near = np.flatnonzero(distance <= self.margin)
            border = len(near)
            if border:
                near = near[np.argsort(distance[near], kind="stable")[:BORDERLINE_SHOWN]]
                nearest = tuple((self.labels[i], float(p[i]), float(self.thresholds[i])) for i in near)
        item = ReviewItem(path, ntags, border, nearest)
        _bounded_push(self._fewest, (-ntags, -self._seq, item), self.keep)
        if border:
            _bounded_push(self._borderline, (border, -self._seq, item), self.keep)

    # -- results ----------------------------------------------------------------------------------------

    def fewest_tags(self) -> list[ReviewItem]:
        """The images with the fewest tags, fewest first (ties: in run order)."""
        return [e[-1] for e in sorted(self._fewest, key=lambda e: (-e[0], -e[1]))]

    def most_borderline(self) -> list[ReviewItem]:
        """The images with the most borderline tags, most first (ties: in run order)."""
        return [e[-1] for e in sorted(self._borderline, key=lambda e: (-e[0], -e[1]))]

    def table(self) -> list[tuple[str, str, int, float]]:
        """(tag, category, count, mean probability) of every tag some image got, most frequent first."""
        used = np.flatnonzero(self.count)
        order = sorted(used, key=lambda i: (-self.count[i], self.labels[i]))
        return [(self.labels[i], self.categories[i] if self.categories else "", int(self.count[i]),
                 float(self.psum[i] / self.count[i])) for i in order]

    def write(self, name: str, thumbnail: Callable[[str], str | None] | None = None) -> list[str]:
        """Write the three files (see the module docstring); returns their paths.

        Args:
            thumbnail: path -> JPEG data URI or None (default `thumbnail_uri`), for the page's thumbnails.
        """
        table_path, review_path, page_path = report_paths(name)
        table = self.table()
        with atomic_write(table_path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["tag", "category", "count", "percent", "mean_probability"])
            for tag, category, count, mean in table:
                w.writerow([tag, category, count, f"{100 * count / self.images:.2f}", f"{mean:.4f}"])
        lists = {"fewest tags": self.fewest_tags(), "borderline": self.most_borderline()}
        with atomic_write(review_path, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["list", "file", "tags", "borderline", "borderline_tags"])
            for which, items in lists.items():
                for it in items:
                    w.writerow([which, it.path, it.tags, it.borderline, "; ".join(
                        f"{t} (p {p:.3f}, threshold {th:.3f})" for t, p, th in it.nearest)])
        page = self.html(table, lists, thumbnail or thumbnail_uri)
        with atomic_write(page_path, "w", encoding="utf-8", newline="") as f:
            f.write(page)
        return [table_path, review_path, page_path]

    def html(self, table, lists: dict[str, list[ReviewItem]], thumbnail: Callable[[str], str | None]) -> str:
        e = html.escape
        total = int(self.count.sum())
        mean_tags = total / self.images if self.images else 0.0
        how = (f"borderline = a probability within ±{self.margin:g} of the tag's threshold"
               if self.thresholds is not None else "no thresholds (top k), so no borderline tags")
        parts = [
            "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Dataset report</title>",
            f"<style>{PAGE_CSS}</style></head><body><h1>Dataset report</h1>",
            f"<p>{self.images} image{'s' * (self.images != 1)} tagged; {len(table)} distinct tags; "
            f"{mean_tags:.1f} tags per image on average; {e(how)}.</p>",
        ]
        if table:
            parts.append(f"<h2>Top tags</h2><img class='chart' alt='bar chart of the top tags' "
                         f"src='{chart_uri(table[:CHART_TAGS], self.images)}'>")
        parts.append("<h2>Tags</h2><table><tr><th>tag</th><th>category</th><th>count</th><th>%</th>"
                     "<th>mean p</th></tr>")
        for tag, category, count, mean in table[:TABLE_TAGS]:
            parts.append(f"<tr><td>{e(tag)}</td><td>{e(category)}</td><td>{count}</td>"
                         f"<td>{100 * count / self.images:.1f}</td><td>{mean:.3f}</td></tr>")
        parts.append("</table>")
        if len(table) > TABLE_TAGS:
            parts.append(f"<p>{len(table) - TABLE_TAGS} more tags in the CSV.</p>")
        titles = {"fewest tags": "Images with the fewest tags", "borderline": "Images with the most borderline tags"}
        for which, items in lists.items():
            parts.append(f"<h2>{titles[which]}</h2>")
            if not items:
                parts.append("<p>None.</p>")
            parts.append("<div class='grid'>")
            for it in items:
                uri = thumbnail(it.path)
                img = (f"<img src='{uri}' alt='{e(os.path.basename(it.path))}'>" if uri
                       else "<div class='none'>no preview</div>")
                near = "".join(f"<li>{e(t)}: p {p:.3f} / {th:.3f}</li>" for t, p, th in it.nearest)
                parts.append(f"<figure>{img}<figcaption><b title='{e(it.path)}'>{e(it.path)}</b><br>"
                             f"{it.tags} tags, {it.borderline} borderline<ul>{near}</ul></figcaption></figure>")
            parts.append("</div>")
        parts.append("</body></html>\n")
        return "".join(parts)


PAGE_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; } td, th { padding: 2px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.chart { max-width: 100%; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 180px; } figure img, .none { max-width: 160px; max-height: 160px; display: block; }
.none { width: 160px; height: 100px; background: #eee; color: #888; text-align: center; line-height: 100px; }
figcaption { font-size: 12px; overflow-wrap: anywhere; } figcaption ul { margin: 2px 0; padding-left: 16px; }
"""


def _bounded_push(heap: list, entry: tuple, size: int) -> None:
    if size <= 0:
        return
    if len(heap) < size:
        heapq.heappush(heap, entry)
    else:
        heapq.heappushpop(heap, entry)  # drops the smallest: the one ranked last


def thumbnail_uri(path: str, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG data URI of the image at `path` (EXIF-oriented), or None when it cannot be read (a URL,
    a file removed since, anything Pillow cannot open)."""
    from PIL import Image, ImageOps

    if "://" in path:
        return None
    try:
        with Image.open(path) as img:
            img.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P", "PA"):
                img = img.convert("RGBA")
                white = Image.new("RGBA", img.size, "white")
                img = Image.alpha_composite(white, img)
            img = img.convert("RGB")
            img.thumbnail((side, side))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=THUMB_QUALITY)
    except Exception:  # noqa: BLE001 - any unreadable file just has no preview
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def chart_uri(table: Sequence[tuple[str, str, int, float]], images: int) -> str:
    """A horizontal bar chart (PNG data URI) of the tags' counts, coloured by category."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [t for t, _, _, _ in table][::-1]
    counts = [c for _, _, c, _ in table][::-1]
    cats = [c or "unassigned" for _, c, _, _ in table][::-1]
    cycle = iter(["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf"] * 100)
    colours = {c: CATEGORY_COLOURS.get(c) or next(cycle) for c in dict.fromkeys(cats)}
    fig = Figure(figsize=(8, 1 + 0.26 * len(names)), dpi=100)
    ax = fig.add_subplot()
    ax.barh(range(len(names)), counts, color=[colours[c] for c in cats])
    ax.set_yticks(range(len(names)), names, fontsize=9)
    ax.set_xlabel(f"images (of {images})")
    ax.set_xlim(0, max(counts) * 1.05 if counts else 1)
    if any(c for _, c, _, _ in table):
        ax.legend(handles=[Patch(color=v, label=k) for k, v in colours.items()], fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
