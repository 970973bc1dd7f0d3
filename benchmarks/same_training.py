"""Does a change of the module change training? A tiny run whose history and weights can be compared bit for bit.

Run it once from a checkout before the change and once after, then diff the outputs::

    git worktree add /tmp/before <commit>
    python benchmarks/same_training.py /tmp/before > before.txt
    python benchmarks/same_training.py . > after.txt
    diff <(tail -2 before.txt) <(tail -2 after.txt)

It trains a ResNet18 U-Net at 64 px for 2 epochs on the quick subset (fp32, one thread, so that
the arithmetic repeats) and prints the history and the sum of all weights. Log in results/restructure/.
"""
import json
import sys
import tempfile

import torch

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else ".")
import lungseg_utils as L  # noqa: E402

torch.set_num_threads(1)
table = L.build_pairs_table(L.find_data_dir())
split = L.quick_subset(L.three_way_split(table), 40)
config = L.TrainConfig(encoder="resnet18", image_size=64, epochs=2, batch_size=4, device="cpu", mixed_precision=False)
train_arrays, val_arrays = (L.load_arrays(split[part], 64) for part in ("train", "val"))
with tempfile.TemporaryDirectory() as folder:
    result = L.train(train_arrays, val_arrays, f"{folder}/run", config)
print(json.dumps(result.history[["epoch", "train_loss", "val_loss", "val_dice", "lr"]].to_dict("list")))
print(float(sum(parameter.detach().double().sum() for parameter in result.model.parameters())))
