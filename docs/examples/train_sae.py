"""Train a sparse autoencoder on what fine-tuning changed: the SS - BB differences of a store.

Uses the ``dictionary-learning`` package (``trainSAE`` takes any iterator of activation
batches) fed by :func:`analysis.activation_loader`; prints the reconstruction loss and the
fraction of variance explained of the SAE at step 0 and after training, on four batches of
the same selection drawn in another order.

    python docs/examples/train_sae.py outputs/tiny.zarr --layer 2 --steps 300
    python docs/examples/train_sae.py outputs/tiny.zarr --layer 2 --dry-run     # what the loader holds

A crosscoder takes ``passes=("BB", "SS")`` instead of ``pair=``: batches ``(batch, 2, dim)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def endless(loader):
    """The loader's epochs one after another (trainSAE stops after ``steps`` batches)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def evaluate(ae, batches) -> dict:
    import torch

    with torch.no_grad():
        x = torch.cat(batches)
        x_hat = ae(x)
        mse = (x - x_hat).pow(2).sum(-1).mean().item()
        fve = 1 - (x - x_hat).pow(2).sum().item() / (x - x.mean(0)).pow(2).sum().item()
    return {"mse": round(mse, 6), "frac_variance_explained": round(fve, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store")
    parser.add_argument("--layer", type=int, required=True)
    parser.add_argument("--pair", default="BB-SS", help="differences RIGHT - LEFT (default BB-SS)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--expansion", type=int, default=4, help="dictionary size / activation dim")
    parser.add_argument("--shuffle-buffer", default="64MiB")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="describe the loader and stop")
    args = parser.parse_args()
    import torch

    from analysis import activation_loader
    from analysis.loader.stats import loader_stats

    loader = activation_loader(args.store, layer=args.layer, pair=args.pair, batch_size=args.batch_size,
                               shuffle_buffer=args.shuffle_buffer, seed=args.seed, normalize=True)
    if args.dry_run:
        print(json.dumps(loader_stats(loader), indent=2))
        return
    from dictionary_learning.dictionary import AutoEncoder
    from dictionary_learning.trainers.standard import StandardTrainer
    from dictionary_learning.training import trainSAE

    dim = loader.selection.dim
    evaluation = list(activation_loader(args.store, layer=args.layer, pair=args.pair, batch_size=args.batch_size,
                                      seed=args.seed + 1, scales=loader.scales))[:4]
    config = {"trainer": StandardTrainer, "activation_dim": dim, "dict_size": args.expansion * dim, "lr": 1e-3,
              "l1_penalty": 0.02, "warmup_steps": 20, "sparsity_warmup_steps": 50, "steps": args.steps,
              "layer": args.layer, "lm_name": "resdiff", "device": "cpu", "seed": args.seed}
    with tempfile.TemporaryDirectory() as out:
        torch.manual_seed(args.seed)
        trainSAE(endless(loader), [config], steps=args.steps, save_dir=out, save_steps=[0], device="cpu")
        trained = Path(out) / "trainer_0"
        results = {}
        for name, weights in (("start", trained / "checkpoints" / "ae_0.pt"), ("end", trained / "ae.pt")):
            ae = AutoEncoder(dim, args.expansion * dim)
            ae.load_state_dict(torch.load(weights))
            results[name] = evaluate(ae, evaluation)
    print(json.dumps({"rows": loader.n_rows, "steps": args.steps, "dim": dim, **results}))


if __name__ == "__main__":
    main()
