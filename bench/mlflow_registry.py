#!/usr/bin/env python3
"""MLflow side of the registry benchmark (local SQLite store, no server).

Logs RUNS runs x POINTS metric points with MLflow's batch API, the same shape
as bench/src/registry_bench.rs (params aux/codebook_size/lr/seed; val_bpd every
third step, train_loss otherwise), then asks for the best 10 runs by val_bpd
where aux = msp through search_runs.

Usage: /tmp/benchvenv/bin/python bench/mlflow_registry.py [RUNS] [POINTS]
(`pip install mlflow==3.17.2` into that venv first).
"""
import os
import statistics
import sys
import tempfile
import time

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    per_run = int(sys.argv[2]) if len(sys.argv) > 2 else 150
    d = tempfile.mkdtemp(prefix="mlflow-bench-")
    db = os.path.join(d, "mlflow.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.create_experiment("bench", artifact_location=os.path.join(d, "art"))
    t = time.perf_counter()
    points = 0
    log_time = 0.0
    for i in range(runs):
        run = client.create_run(exp)
        rid = run.info.run_id
        params = [Param("aux", "msp" if i % 2 == 0 else "ff"), Param("codebook_size", str(64 << (i % 4))),
                  Param("lr", str(1e-4 * (1 + i % 7))), Param("seed", str(i))]
        metrics = []
        for step in range(per_run):
            if step % 3 == 2:
                metrics.append(Metric("val_bpd", 8.0 / (1.0 + step) + (i % 97) * 1e-3, 0, step))
            else:
                metrics.append(Metric("train_loss", 1.0 / (1.0 + step), 0, step))
        t0 = time.perf_counter()
        for k in range(0, len(metrics), 1000):
            client.log_batch(rid, metrics=metrics[k:k + 1000], params=params if k == 0 else [])
        log_time += time.perf_counter() - t0
        points += len(metrics)
        client.set_terminated(rid)
    total = time.perf_counter() - t
    times = []
    for _ in range(11):
        t0 = time.perf_counter()
        best = client.search_runs([exp], filter_string="params.aux = 'msp'",
                                  order_by=["metrics.val_bpd ASC"], max_results=10)
        times.append((time.perf_counter() - t0) * 1000)
    assert len(best) == min(10, runs // 2)
    size = os.path.getsize(db)
    print(f"mlflow {mlflow.__version__}: {runs} runs x {per_run} points = {points} points")
    print(f"  log_batch: {points / log_time:.0f} points/s (metric calls only); "
          f"{points / total:.0f} points/s including run creation")
    print(f"  file size {size / 1e6:.1f} MB = {size / points:.1f} bytes/point")
    print(f"  best-10 search_runs: median {statistics.median(times):.1f} ms over 11, min {min(times):.1f} ms")


if __name__ == "__main__":
    main()
