"""Do the samples read as digits? A measure of "learned" for the quickstart, beside FID.

A classifier fitted on scikit-learn's digits (an RBF support-vector machine with calibrated
probabilities, about 99% accurate on held-out digits) reads each image at 8x8 in grey, as the digits
were scanned. It reports two figures, also computed for the ends of the scale. The real digits
score high: the training and held-out images from the shards. Pure noise scores low. The figures:
  confident  the share of images classified with probability >= 0.9 that are also no farther from
             the nearest real digit than 99.5% of real digits are from theirs;
  entropy    the entropy of the predicted-class histogram over log(10): 1 when every digit is
             drawn equally often, 0 when every image gets the same class.
Why the distance: any classifier's probabilities are meaningless far from its data (a plain grey
square is "a 4" with p = 1), and noise would count as confident digits.

    python -m scripts.digit_score SAMPLES_DIR --shards SHARDS   # SAMPLES_DIR from `eval fid`/`eval sample`
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from pipeline.errors import run_cli
from scripts.quickstart_data import MARGIN, SIDE, draw, load_digits

CONFIDENT = 0.9
NEAR_PERCENTILE = 99.5


@dataclass
class Score:
    images: int
    confident: float  # share with max class probability >= CONFIDENT and near a real digit
    entropy: float  # of the argmax histogram, / log(10)
    histogram: list[int]

    def line(self, name: str) -> str:
        return f"{name:<16} {self.images:>6} {self.confident:>10.1%} {self.entropy:>8.2f}"


def features(images: np.ndarray) -> np.ndarray:
    """uint8 [n, H, W, 3] (any H, W) -> float32 [n, 64]: ink over 8x8 cells, stretched per image
    from its lightest cell (0) to its darkest (1). A reader ignores a tinted page or faint ink,
    and so does this; a blank page stays all 0."""
    out = np.empty((len(images), 64), np.float32)
    for i, img in enumerate(images):
        grey = Image.fromarray(np.ascontiguousarray(img)).convert("L").resize((8, 8), Image.BOX)
        ink = 1 - np.asarray(grey, np.float32).ravel() / 255
        lo, span = ink.min(), ink.max() - ink.min()
        out[i] = (ink - lo) / span if span > 1 / 255 else 0
    return out


class DigitClassifier:
    """Fitted on all 1,797 digits as the LMDB draws them (its centre square); deterministic."""

    def __init__(self):
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.neighbors import NearestNeighbors
        from sklearn.svm import SVC

        ink, labels = load_digits()
        x = features(np.stack([np.asarray(draw(i))[:, MARGIN:MARGIN + SIDE] for i in ink]))
        # Platt scaling on 5 folds (SVC(probability=True)'s method, which scikit-learn 1.9 deprecates).
        self.clf = CalibratedClassifierCV(SVC(C=10), ensemble=False).fit(x, labels)
        self.nn = NearestNeighbors(n_neighbors=2).fit(x)
        # Each real digit's distance to its nearest other digit: 99.5% of them are within `near`.
        self.near = float(np.percentile(self.nn.kneighbors(x)[0][:, 1], NEAR_PERCENTILE))

    def score(self, images: np.ndarray) -> Score:
        x = features(images)
        p = self.clf.predict_proba(x)
        near = self.nn.kneighbors(x, n_neighbors=1)[0][:, 0] <= self.near
        hist = np.bincount(p.argmax(1), minlength=10)
        share = hist[hist > 0] / len(p)
        return Score(images=len(p), confident=float(((p.max(1) >= CONFIDENT) & near).mean()),
                     entropy=float(-(share * np.log(share)).sum() / np.log(10)), histogram=hist.tolist())


def noise_images(n: int, resolution: int, seed: int = 0) -> np.ndarray:
    """What sampling starts from, x_T ~ N(0, I), as pixels: the bottom of the scale."""
    x = np.random.default_rng(seed).standard_normal((n, resolution, resolution, 3))
    return np.clip(np.round((x + 1) * 127.5), 0, 255).astype(np.uint8)


def split_images(shards: str, split: str) -> np.ndarray:
    from eval.features import iter_uint8

    return np.concatenate(list(iter_uint8(shards, split, batch_size=256)))


def score_table(clf: DigitClassifier, samples: np.ndarray, shards: str | None) -> dict[str, Score]:
    """The samples' figures beside the training images', the held-out images' and noise's."""
    rows = {"samples": clf.score(samples)}
    if shards:
        rows["training images"] = clf.score(split_images(shards, "train"))
        rows["held-out images"] = clf.score(split_images(shards, "test"))
    rows["noise"] = clf.score(noise_images(len(samples), samples.shape[1]))
    return rows


def print_table(rows: dict[str, Score]) -> None:
    print(f"{'':<16} {'images':>6} {'confident':>10} {'entropy':>8}   (confident: p >= {CONFIDENT}; "
          "entropy of the class histogram, 1 = all ten digits equally)")
    for name, s in rows.items():
        print(s.line(name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("samples", help="a folder written by `python -m eval fid` or `eval sample` (chunks/*.npz)")
    ap.add_argument("--shards", default=None, help="the quickstart's shards: score their train and test "
                    "images too")
    ap.add_argument("--json", default=None, help="also write the table here")
    return run_cli(_score, ap.parse_args(argv))


def _score(args) -> None:
    from eval.sample import load_samples
    from pipeline import atomic

    rows = score_table(DigitClassifier(), load_samples(args.samples), args.shards)
    print_table(rows)
    if args.json:
        atomic.write_json(args.json, {k: asdict(v) for k, v in rows.items()})


if __name__ == "__main__":
    raise SystemExit(main())
