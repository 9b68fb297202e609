"""python compare.py REF NEW: equal up to wall-clock fields."""
import json, re, sys
from pathlib import Path
import safetensors, torch

ref, new = Path(sys.argv[1]), Path(sys.argv[2])
WALL = {"train_seconds", "epoch_seconds", "tokens_per_s", "test_seconds", "seconds", "started",
        "machine", "commit"}
RENAMED = {"strategy_p": "dropout"}
bad = []

def clean(v):
    if isinstance(v, dict):
        return {RENAMED.get(k, k): clean(x) for k, x in v.items() if k not in WALL}
    if isinstance(v, list):
        return [clean(x) for x in v]
    return v

def text(p, root):
    t = p.read_text()
    t = t.replace(str(root.resolve()), "ROOT")
    t = re.sub(r" *[\d.,]+ tok/s", " T tok/s", t)
    t = re.sub(r"\d+(\.\d+)? ?(s|min)\b", "S", t)
    t = re.sub(r'"(train_|test_)?seconds": [\d.e-]+', '"seconds": S', t)
    t = re.sub(r"\| \d+ \|\n", "| N |\n", t)
    t = re.sub(r"\d+\.\d+ s", "S", t)
    return t

def check(rel):
    a, b = ref / rel, new / rel
    if not b.exists():
        bad.append(f"missing {rel}"); return
    if rel.endswith(".jsonl"):
        x = [clean(json.loads(l)) for l in a.read_text().splitlines()]
        y = [clean(json.loads(l)) for l in b.read_text().splitlines()]
    elif rel.endswith(".json"):
        x = clean(json.loads(a.read_text().replace(str(ref.resolve()), "ROOT")))
        y = clean(json.loads(b.read_text().replace(str(new.resolve()), "ROOT")))
    elif rel.endswith(".safetensors"):
        with safetensors.safe_open(str(a), "pt") as f, safetensors.safe_open(str(b), "pt") as g:
            if sorted(f.keys()) != sorted(g.keys()):
                bad.append(f"keys differ {rel}"); return
            for k in f.keys():
                if not torch.equal(f.get_tensor(k), g.get_tensor(k)):
                    bad.append(f"tensor {k} differs {rel}")
            x, y = clean(json.loads(f.metadata()["tree"])), clean(json.loads(g.metadata()["tree"]))
            x, y = json.dumps(x), json.dumps(y)
            x = re.sub(r'\["(train|epoch)_seconds", [\d.e-]+\]', "", x)
            y = re.sub(r'\["(train|epoch)_seconds", [\d.e-]+\]', "", y)
    elif rel.endswith((".out", ".md")):
        x, y = text(a, ref), text(b, new)
    else:
        return
    if x != y:
        bad.append(f"differs {rel}")
        if isinstance(x, str):
            import difflib
            print("".join(list(difflib.unified_diff(x.splitlines(True), y.splitlines(True)))[:40]))
        else:
            print(rel, "differs (structured)")

n = 0
for p in sorted(ref.rglob("*")):
    if p.is_file() and "tensorboard" not in p.parts and "corpus" not in p.parts:
        check(str(p.relative_to(ref))); n += 1
extra = {str(p.relative_to(new)) for p in new.rglob("*") if p.is_file() and "tensorboard" not in p.parts} - {
    str(p.relative_to(ref)) for p in ref.rglob("*") if p.is_file()}
print(f"{n} files compared; {len(bad)} problems; extra in new: {sorted(extra)}")
for b in bad: print(" ", b)
