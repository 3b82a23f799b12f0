"""Batch inference over a directory of .npy files on a Dask cluster.

    pip install "convc[distributed]"
    python examples/dask_batch_inference.py DIR [--out OUT] [--workers 2] [--batch 16] [--make N [--file-size M]]

Every ``DIR/*.npy`` holds float32 images for ``convc.models.mobilenet_tiny``:
one image (3, 32, 32) or a stack (n, 3, 32, 32). ``--make N`` first writes N
random images into DIR, in files of 1 to M images (``--file-size``, default
256), to try it out.

The model is compiled once, here. Dask sends it to each worker process
pickled: the graph, its weights and the compile options, no compiled code.
Each worker compiles it again through ``cc.compile``, which finds the
library in the compile cache the processes share (on another machine it
would build it there, for that machine's CPU). Then every task reads one
file, runs it in batches of ``--batch`` images (the last batch padded) and
writes the logits, one row per image, to ``OUT/<name>.npy`` (default OUT:
``DIR/predictions``; on a cluster of several machines OUT must be a shared
directory). The cluster is a ``LocalCluster`` of worker processes with one
thread each, and each task runs the generated code on one OpenMP thread:
workers x threads = the cores it uses.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import convc as cc
from convc.models import mobilenet_tiny

IMAGE = (3, 32, 32)


def make_images(directory: Path, count: int, most: int = 256, seed: int = 0) -> None:
    """Write ``count`` random images into ``directory`` as .npy files of 1 to ``most`` images."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    done = 0
    while done < count:
        n = int(min(count - done, rng.integers(1, most + 1)))
        images = rng.standard_normal((n, *IMAGE)).astype(np.float32)
        np.save(directory / f"images_{done:06d}.npy", images[0] if n == 1 else images)
        done += n


def predict_file(path: str, mod, out_dir: str) -> tuple[str, int, float]:
    """Run ``mod`` over the images in ``path``, write their logits to
    ``out_dir``; return (file name, images, seconds spent in the module)."""
    cc.set_num_threads(1)                   # one OpenMP thread per Dask worker thread
    images = np.load(path)
    if images.shape == IMAGE:
        images = images[None]
    if images.ndim != 4 or images.shape[1:] != IMAGE or images.dtype != np.float32:
        raise ValueError(f"{path}: expected float32 images of shape {IMAGE} or (n, *{IMAGE}), "
                         f"got {images.dtype} {images.shape}")
    batch = mod.inputs["x"].shape[0]
    logits, spent = [], 0.0
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        padded = np.zeros((batch, *IMAGE), np.float32)
        padded[:len(chunk)] = chunk
        t0 = time.perf_counter()
        y = mod(x=padded)
        spent += time.perf_counter() - t0
        logits.append(y[:len(chunk)])
    np.save(Path(out_dir) / Path(path).name, np.concatenate(logits))
    return Path(path).name, len(images), spent


def warm(mod) -> str:
    """Touch the module on a worker (it is rebuilt when it arrives)."""
    return repr(mod)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path, help="directory of .npy files of (3, 32, 32) float32 images")
    ap.add_argument("--out", type=Path, help="where the logits go (default DIR/predictions)")
    ap.add_argument("--workers", type=int, default=2, help="Dask worker processes (default 2)")
    ap.add_argument("--batch", type=int, default=16, help="images per module call (default 16)")
    ap.add_argument("--make", type=int, metavar="N", help="first write N random images into DIR")
    ap.add_argument("--file-size", type=int, default=256, metavar="M", help="--make: at most M images a file")
    args = ap.parse_args(argv)
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        print('this example needs Dask: pip install "convc[distributed]"', file=sys.stderr)
        return 2
    if args.make:
        make_images(args.dir, args.make, args.file_size)
    files = sorted(str(p) for p in args.dir.glob("*.npy"))
    if not files:
        print(f"no .npy files in {args.dir}", file=sys.stderr)
        return 1
    out = args.out or args.dir / "predictions"
    out.mkdir(parents=True, exist_ok=True)

    mod = cc.compile(mobilenet_tiny(batch=args.batch))
    t0 = time.perf_counter()
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        remote = client.scatter(mod, broadcast=True)          # pickled once, one copy per worker
        workers = list(client.scheduler_info()["workers"])
        client.gather([client.submit(warm, remote, workers=[w], pure=False) for w in workers])
        t1 = time.perf_counter()
        results = client.gather(client.map(predict_file, files, mod=remote, out_dir=str(out)))
        t2 = time.perf_counter()
    images = sum(n for _, n, _ in results)
    busy = sum(s for _, _, s in results)
    print(f"cluster of {args.workers} worker process(es), 1 thread each; module rebuilt on every worker: "
          f"{t1 - t0:.1f} s")
    print(f"{images} images in {len(files)} files: {t2 - t1:.2f} s, {images / (t2 - t1):.0f} images/s "
          f"({images / busy:.0f} images/s per worker inside the module)")
    print(f"logits written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
