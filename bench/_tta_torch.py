#!/usr/bin/env python
"""The PyTorch side of bench_time_to_accuracy.py: a plain PyTorch CPU program that trains the
Fashion-MNIST 784-1024-10 ReLU MLP as distffn's job does (He-normal weights, zero biases,
SGD momentum 0.9, lr 0.05 along a per-step cosine over --epochs, batch 128, the short last
batch kept, softmax cross-entropy; inputs /255 then standardized with the training split's
global mean and std) and prints one JSON line per evaluation on the test split (every epoch,
or every --eval-every steps). Reads the IDX files itself, as a user's script would.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys

import numpy as np
import torch


def read_idx(path):
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(folder, base):
    for name in (base, base + ".gz"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise SystemExit(f"{base} not in {folder}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    x_tr = read_idx(find(args.data, "train-images-idx3-ubyte")).reshape(60000, -1)
    y_tr = read_idx(find(args.data, "train-labels-idx1-ubyte")).astype(np.int64)
    x_te = read_idx(find(args.data, "t10k-images-idx3-ubyte")).reshape(10000, -1)
    y_te = read_idx(find(args.data, "t10k-labels-idx1-ubyte")).astype(np.int64)
    X = torch.from_numpy(x_tr.astype(np.float32) / 255)
    mean, std = X.mean(), X.std()
    X = (X - mean) / std
    Xt = (torch.from_numpy(x_te.astype(np.float32) / 255) - mean) / std
    Y, Yt = torch.from_numpy(y_tr), torch.from_numpy(y_te)
    nn = torch.nn
    net = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    with torch.no_grad():
        for lin in (net[0], net[2]):
            lin.weight.normal_(0, math.sqrt(2.0 / lin.in_features))
            lin.bias.zero_()
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    n, B = X.shape[0], args.batch_size
    spe = -(-n // B)
    total = spe * args.epochs
    step = 0
    print(json.dumps({"event": "start"}), flush=True)

    def evaluate():
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(Xt[s:s + 4096]).argmax(1) == Yt[s:s + 4096]).sum())
                          for s in range(0, Xt.shape[0], 4096))
        net.train()
        print(json.dumps({"event": "eval", "step": step, "epoch": step / spe,
                          "test_accuracy": correct / Xt.shape[0]}), flush=True)

    for epoch in range(args.epochs):
        perm = torch.randperm(n)
        for b in range(spe):
            for g in opt.param_groups:
                g["lr"] = 0.5 * args.lr * (1 + math.cos(math.pi * step / total))
            idx = perm[b * B:(b + 1) * B]
            opt.zero_grad(set_to_none=True)
            loss_fn(net(X[idx]), Y[idx]).backward()
            opt.step()
            step += 1
            if args.eval_every and step % args.eval_every == 0:
                evaluate()
        if not args.eval_every:
            evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
