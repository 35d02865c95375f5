"""The inputs of the Ray engine's scale model, measured here, and what they predict.

    python benchmarks/bench_ray_model.py [--rows 2000000] [--cores-per-node 8] [--nic-gbit 10]

On the sales file (``--rows`` rows), with a local Ray of this machine's CPUs:

* encode, per core: ``encode_batch`` on every batch in this process (rows/s);
* driver read: ``read_batches`` and putting each batch into the object store (rows/s);
* driver take: results already in the store, taken in order, merged, cut into chunks
  and written to a file (rows/s, and bytes/s of Typst text);
* merge: ``Collector.add`` of the analysis partials of the benchmarks' analysis report
  (2 group levels, 4 variables, a chart), per batch (batches/s).

The driver reads every row and takes every result, so with N nodes of C cores:

    rows/s = min(N * C * encode, read, take, NIC / text bytes per row)

and for a report whose rows do not travel back (only partials):

    rows/s = min(N * C * encode, read, merge * rows per batch)

The NIC term (``--nic-gbit``) is an assumption: one machine cannot measure a network.
Prints the inputs and the predictions for 4, 16 and 64 nodes; writes
benchmarks/results/bench_ray_model.json.
"""

from __future__ import annotations

import argparse
import shutil
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


def measure(rows: int, workdir: Path) -> dict:
    parquet, report_path = sales_files(workdir, rows)
    report = load_report(report_path)
    options = EncodeOptions(timezone=report.pipeline.timezone)
    batches = list(read_batches(report, CHUNK_SIZE).batches)
    arrow_bytes = sum(b.nbytes for b in batches)

    start = time.perf_counter()
    first = 0
    text_bytes = 0
    for batch in batches:
        done = encode_batch(batch, first, CHUNK_SIZE, options, None)
        first += batch.num_rows
        text_bytes += done.text.size
    encode_s = time.perf_counter() - start

    with RayPool():
        start = time.perf_counter()
        source = read_batches(report, CHUNK_SIZE)
        refs = [ray.put(batch) for batch in source.batches]
        read_s = time.perf_counter() - start
        del refs

        results, first = [], 0
        for batch in batches:
            results.append(_encode_task.remote(batch, first, CHUNK_SIZE, options, None, 0))
            first += batch.num_rows
        ray.wait(results, num_returns=len(results))
        merge = OrderedMerge(None, CHUNK_SIZE)
        start = time.perf_counter()
        with open(workdir / "out.typ", "wb") as out:
            for ref in results:
                for chunk in merge.take(ray.get(ref)):
                    out.write(chunk.text)
        take_s = time.perf_counter() - start
        del results

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
    collector = Collector(analysis)
    start = time.perf_counter()
    for done, first_row in partials:
        collector.add(done.partial, first_row)
    merge_s = time.perf_counter() - start

    return {
        "rows": rows,
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
    nic_rows = nic_gbit * 1e9 / 8 / inputs["text_bytes_per_row"]
    merge_rows = inputs["merge_batches_per_s"] * inputs["rows_per_batch"]
    out = []
    for nodes in NODES:
        compute = nodes * cores_per_node * inputs["encode_rows_per_s_per_core"]
        detail = {
            "cluster encode": compute,
            "driver read": inputs["driver_read_rows_per_s"],
            "driver take": inputs["driver_take_rows_per_s"],
            "driver NIC": nic_rows,
        }
        partials = {
            "cluster encode": compute,
            "driver read": inputs["driver_read_rows_per_s"],
            "driver merge": merge_rows,
        }
        out.append(
            {
                "nodes": nodes,
                "detail_rows_per_s": min(detail.values()),
                "detail_bound": min(detail, key=detail.get),
                "partials_rows_per_s": min(partials.values()),
                "partials_bound": min(partials, key=partials.get),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--cores-per-node", type=int, default=8)
    parser.add_argument("--nic-gbit", type=float, default=10.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="ashstream-bench-"))
    try:
        inputs = measure(args.rows, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    predictions = predict(inputs, args.cores_per_node, args.nic_gbit)
    for name, value in inputs.items():
        print(f"{name:>30}: {value:,.1f}")
    print(f"\n{args.cores_per_node} cores a node, a {args.nic_gbit:g} Gbit/s NIC at the driver")
    print(
        f"{'nodes':>6} {'with detail rows/s':>20} {'bound':>15} {'partials rows/s':>17} {'bound':>15}"
    )
    for p in predictions:
        print(
            f"{p['nodes']:>6} {p['detail_rows_per_s']:>20,.0f} {p['detail_bound']:>15} "
            f"{p['partials_rows_per_s']:>17,.0f} {p['partials_bound']:>15}"
        )
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
