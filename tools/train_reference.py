"""Train the reference model from scratch on CPU (deterministic; about 50 minutes on 2 cores).

    python tools/train_reference.py --out reference/weights/reference.safetensors

Writes the EMA weights (fp16 safetensors with the vocabulary and configs in
its metadata), ``training_log.json`` and ``loss_curve.png`` next to them.
Then run ``python tools/evaluate_reference.py`` to measure the model card's numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import fields
from pathlib import Path

from prompt_fragments.reference.training import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reference/weights/reference.safetensors")
    for f in fields(TrainConfig):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    out = Path(args.out)
    log_path = out.with_name("training_log.json")
    history: list[dict] = []

    def on_log(entry: dict) -> None:  # written as it goes, so a long run can be watched
        history.append(entry)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text(json.dumps(history))

    train(config, out, on_log=on_log)
    from prompt_fragments.metrics.plots import loss_curve_plot

    loss_curve_plot([h["step"] for h in history], [h["loss"] for h in history], out.with_name("loss_curve.png"),
                    f"reference model: v-prediction MSE, batch {config.batch_size}")


if __name__ == "__main__":
    main()
