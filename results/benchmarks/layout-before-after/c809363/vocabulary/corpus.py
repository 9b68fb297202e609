import torch
def write_corpus(directory, tokens, seed, vocab):
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(vocab - 1)]
    for split, count in (("train", tokens), ("valid", 2000), ("test", 2000)):
        ids = torch.randint(0, vocab - 1, (count,), generator=g).tolist()
        lines = [" ".join(words[i] for i in ids[s:s + 20]) for s in range(0, count, 20)]
        if split == "train":
            lines.append(" ".join(words))
        (directory / f"{split}.txt").write_text("\n".join(lines) + "\n")
