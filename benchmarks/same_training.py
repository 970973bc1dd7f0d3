"""Does a change of the module change training? A tiny run whose history and weights can be compared bit for bit.

Run it once from a checkout before the change and once after, then diff the outputs::

    git worktree add /tmp/before <commit>
    python benchmarks/same_training.py /tmp/before > before.txt
    python benchmarks/same_training.py . > after.txt
    diff <(tail -2 before.txt) <(tail -2 after.txt)

It trains a ResNet18 U-Net at 64 px for 2 epochs on the quick subset and prints the history and
a SHA-256 of all trained weights: in fp32 on one thread by default, or with ``--mixed-precision`` as chapter 03
trains (bf16 autocast where the CPU has it natively, all threads). Log in results/restructure/.
"""
import argparse
import hashlib
import json
import sys
import tempfile

import torch

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("checkout", help="the repository folder whose lungseg_utils.py to use")
parser.add_argument("--mixed-precision", action="store_true", help="train as chapter 03 does (bf16 where native)")
args = parser.parse_args()
sys.path.insert(0, args.checkout)
import lungseg_utils as L  # noqa: E402

if not args.mixed_precision:
    torch.set_num_threads(1)
table = L.build_pairs_table(L.find_data_dir())
split = L.quick_subset(L.three_way_split(table), 40)
config = L.TrainConfig(encoder="resnet18", image_size=64, epochs=2, batch_size=4, device="cpu",
                       mixed_precision=args.mixed_precision)
train_arrays, val_arrays = (L.load_arrays(split[part], 64) for part in ("train", "val"))
with tempfile.TemporaryDirectory() as folder:
    result = L.train(train_arrays, val_arrays, f"{folder}/run", config)
print(json.dumps(result.history[["epoch", "train_loss", "val_loss", "val_dice", "lr"]].to_dict("list")))
digest = hashlib.sha256()
for name, tensor in result.model.state_dict().items():
    digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
print(digest.hexdigest())
