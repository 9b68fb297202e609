import sys, tempfile
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
try:
    from rnnreg.lm.training import train
    from rnnreg.lm.presets import preset_config
except ImportError:
    from rnnreg.train import train
    from rnnreg.presets import preset_config
exec(open("notes/bench/corpus.py").read())
config = preset_config("small").replace(epochs=1, eval_bptt=200, checkpoint_minutes=0)
log = []
class Rec(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        desc = [f"{tuple(t.shape)}s{t.stride()}{str(t.dtype)[6:]}{'' if t.is_contiguous() else 'NC'}" for t in flat if isinstance(t, torch.Tensor)]
        log.append(f"{func} {' '.join(desc)}")
        return func(*args, **(kwargs or {}))
step = {"n": 0}
rec = Rec()
def on_step(s):
    if s == 2: rec.__enter__(); log.append("----start step 3")
    if s == 3: rec.__exit__(None, None, None)
with tempfile.TemporaryDirectory() as tmp:
    d = Path(tmp) / "c"; d.mkdir()
    write_corpus(d, 6 * 20 * 20 + 1, seed=0, vocab=10000)
    train(config, Path(tmp) / "run", data_dir=d, progress=False, verbose=False, on_step=on_step)
open(sys.argv[2], "w").write("\n".join(log) + "\n")
