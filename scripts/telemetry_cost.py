"""What telemetry costs: a training step with and without the telemetry probe, alternated on the same batches.

Each model as ``scripts/adaptive_vs_fixed.py`` configures it (``topk``, ``ratio=0.3``); prints the
median plain step, the median measured step (one extra exact forward and backward, the norms, a sort
per layer) and their ratio.

    nice -n 10 python scripts/telemetry_cost.py --data ../shared/data mlp cnn lstm
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from approxtrain.run.callbacks import Batch, TelemetryCallback
from approxtrain.run.trainer import Trainer
from approxtrain.telemetry import Telemetry
from adaptive_vs_fixed import MODELS, run_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", choices=list(MODELS))
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for model in args.models:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(run_config(model, args.data, "ratio=0.3"), Path(run_dir) / "run")
            trainer.setup()
            trainer.model.train()
            batches = [batch for _, batch in zip(range(args.batches), trainer.train_loader)]
            telemetry, times = TelemetryCallback(Telemetry(trainer.model, every=1)), {False: [], True: []}
            for _ in range(args.rounds):
                for measured in (False, True):
                    trainer.callbacks = [telemetry] if measured else []
                    for index, (input, target) in enumerate(batches):
                        started = time.perf_counter()
                        batch = Batch(1, index, index, *trainer.to_device(input, target))
                        for callback in trainer.callbacks:
                            callback.on_train_batch_start(trainer, batch)
                        trainer.training_step(batch)
                        times[measured].append(time.perf_counter() - started)
        plain, measured = statistics.median(times[False]), statistics.median(times[True])
        print(f"| {model} | {plain * 1e3:.1f} ms | {measured * 1e3:.1f} ms | {measured / plain:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
