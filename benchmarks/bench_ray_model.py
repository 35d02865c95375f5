"""The inputs of the Ray engine's scale model, measured here, and what they predict.

    python benchmarks/bench_ray_model.py [--rows 2000000] [--cores-per-node 8] [--nic-gbit 10]
                                         [--repeats 5]

On the sales file (``--rows`` rows), with a local Ray of this machine's CPUs, each the
median of ``--repeats`` runs:

* encode, per core: ``encode_batch`` on every batch in this process (rows/s);
* driver read: ``read_batches`` and putting each batch into the object store (rows/s);
* driver take: results already in the store, taken in order, merged, cut into chunks
  and written to a file (rows/s, and bytes/s of Typst text);
* merge: ``Collector.add`` of the analysis partials of the benchmarks' analysis report
  (2 group levels, 4 variables, a chart), per batch (batches/s).

With N nodes of C cores, for a Parquet report read on the cluster whose rows the
driver writes ("detail"):

    rows/s = min(N * C * encode, take, NIC / text bytes per row)

if only the analysis partials travelled back ("partials only", not a mode ashstream
has yet: rows are always written):

    rows/s = min(N * C * encode, merge * rows per batch)

and for a report with an ordered stage (a sort or a running value: the driver reads):

    rows/s = min(N * C * encode, take, NIC / text bytes per row, read)

The NIC term (``--nic-gbit``) is an assumption: one machine cannot measure a network.
Prints the inputs and the predictions for 4, 16 and 64 nodes; writes
benchmarks/results/bench_ray_model.json.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray
from _harness import write_results
from bench_pipeline import GROUPS, VARIABLES, sales_files

from ashstream import load_report
from ashstream.analysis.aggregate import Analysis, Collector
from ashstream.batch_job import encode_batch, read_batches
from ashstream.chunks import OrderedMerge
from ashstream.encode import EncodeOptions
from ashstream.engines.ray import RayPool, _encode_task

NODES = (4, 16, 64)
CHUNK_SIZE = 10_000


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def _median_s(work, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``work`` (this machine is noisy)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(rows: int, workdir: Path, repeats: int) -> dict:
    parquet, report_path = sales_files(workdir, rows)
    report = load_report(report_path)
    options = EncodeOptions(timezone=report.pipeline.timezone)
    batches = list(read_batches(report, CHUNK_SIZE).batches)
    arrow_bytes = sum(b.nbytes for b in batches)
    firsts = list(itertools.accumulate((b.num_rows for b in batches), initial=0))
    text_bytes = sum(
        encode_batch(b, first, CHUNK_SIZE, options, None).text.size
        for b, first in zip(batches, firsts, strict=False)
    )

    def encode() -> None:
        for batch, first in zip(batches, firsts, strict=False):
            encode_batch(batch, first, CHUNK_SIZE, options, None)

    encode_s = _median_s(encode, repeats)

    with RayPool():

        def read() -> None:
            source = read_batches(report, CHUNK_SIZE)
            refs = [ray.put(batch) for batch in source.batches]
            del refs

        read_s = _median_s(read, repeats)
        results = [
            _encode_task.remote(batch, first, CHUNK_SIZE, options, None, 0)
            for batch, first in zip(batches, firsts, strict=False)
        ]
        ray.wait(results, num_returns=len(results))

        def take() -> None:
            merge = OrderedMerge(None, CHUNK_SIZE)
            with open(workdir / "out.typ", "wb") as out:
                for ref in results:
                    for chunk in merge.take(ray.get(ref)):
                        out.write(chunk.text)

        take_s = _median_s(take, repeats)
        results.clear()  # the objects go with their references

    analysed = workdir / "analysed.yaml"
    analysed.write_text(
        f"name: analysed\nsource:\n  parquet: {parquet.name}\n  order_by: [region, day]\n"
        + GROUPS
        + VARIABLES
    )
    analysis_report = load_report(analysed)
    analysis = Analysis.of(analysis_report)
    partials, first = [], 0
    for batch in read_batches(analysis_report, CHUNK_SIZE).batches:
        partials.append((encode_batch(batch, first, CHUNK_SIZE, options, analysis), first))
        first += batch.num_rows

    def merge() -> None:
        collector = Collector(analysis)
        for done, first_row in partials:
            collector.add(done.partial, first_row)

    merge_s = _median_s(merge, repeats)

    return {
        "rows": rows,
        "repeats": repeats,
        "batches": len(batches),
        "rows_per_batch": rows / len(batches),
        "arrow_bytes_per_row": arrow_bytes / rows,
        "text_bytes_per_row": text_bytes / rows,
        "encode_rows_per_s_per_core": _rate(rows, encode_s),
        "driver_read_rows_per_s": _rate(rows, read_s),
        "driver_take_rows_per_s": _rate(rows, take_s),
        "driver_take_text_bytes_per_s": _rate(text_bytes, take_s),
        "merge_batches_per_s": _rate(len(partials), merge_s),
    }


def predict(inputs: dict, cores_per_node: int, nic_gbit: float) -> list[dict]:
    """Rows/s and the bound, per node count, for three kinds of report."""
    nic_rows = nic_gbit * 1e9 / 8 / inputs["text_bytes_per_row"]
    merge_rows = inputs["merge_batches_per_s"] * inputs["rows_per_batch"]
    out = []
    for nodes in NODES:
        compute = nodes * cores_per_node * inputs["encode_rows_per_s_per_core"]
        take = inputs["driver_take_rows_per_s"]
        kinds = {
            # Parquet read on the cluster, every row's text written by the driver
            "detail": {"cluster encode": compute, "driver take": take, "driver NIC": nic_rows},
            # the same, if only the partials came back (rows not written)
            "partials": {"cluster encode": compute, "driver merge": merge_rows},
            # a sort or a running value: the driver reads every row too
            "ordered": {
                "cluster encode": compute,
                "driver take": take,
                "driver NIC": nic_rows,
                "driver read": inputs["driver_read_rows_per_s"],
            },
        }
        row = {"nodes": nodes}
        for kind, bounds in kinds.items():
            row[f"{kind}_rows_per_s"] = min(bounds.values())
            row[f"{kind}_bound"] = min(bounds, key=bounds.get)
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cores-per-node", type=int, default=8)
    parser.add_argument("--nic-gbit", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    try:
        inputs = measure(args.rows, workdir, args.repeats)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    predictions = predict(inputs, args.cores_per_node, args.nic_gbit)
    for name, value in inputs.items():
        print(f"{name:>30}: {value:,.1f}")
    print(f"\n{args.cores_per_node} cores a node, a {args.nic_gbit:g} Gbit/s NIC at the driver")
    print(f"{'nodes':>6} {'detail rows/s':>30} {'partials only':>30} {'ordered stage':>30}")
    for p in predictions:
        cells = [
            f"{p[f'{kind}_rows_per_s']:,.0f} ({p[f'{kind}_bound']})"
            for kind in ("detail", "partials", "ordered")
        ]
        print(f"{p['nodes']:>6} " + " ".join(f"{c:>30}" for c in cells))
    path = write_results(
        "bench_ray_model",
        {
            "inputs": inputs,
            "cores_per_node": args.cores_per_node,
            "nic_gbit": args.nic_gbit,
            "predictions": predictions,
        },
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
