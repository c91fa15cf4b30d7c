"""What evaluations compute, exact under DDP: top-k accuracy and DINO's weighted k-NN classifier
(features of a split are extracted by data/features.py, which the linear probe's cache uses too).

Every rank reads its own part of the split (each sample exactly once over all ranks, see
data/stream.py); counts are summed over ranks, and features are gathered without padding or
duplicates, so the numbers are those of a single process on the whole split.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.loaders import build_eval_loader
from ..data.features import Rounds, extract_features, progress

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]


def _sum_over_ranks(values: torch.Tensor, accelerator) -> torch.Tensor:
    if accelerator is not None and accelerator.num_processes > 1:
        return accelerator.reduce(values, reduction="sum")
    return values


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many of `labels` are among the top-k predictions, for each k: [len(ks)]."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # [B, kmax]
    hits = top == labels.unsqueeze(1)
    return torch.stack([hits[:, :k].any(dim=1).sum() for k in ks]).float()


@torch.no_grad()
def evaluate(predict: Callable[[dict], Logits], batches: Iterable[dict], *, device, normalize=None,
             accelerator=None, description: str = "evaluating", rounds: Rounds = None) -> list[dict]:
    """Top-1 / top-5 (percent) of `predict` over a split; `predict` takes the batch on the device,
    its images normalised (or cached features, `features`). It may return several logits (one per
    head, e.g. a learning-rate sweep): one result per head."""
    counts, total = None, torch.zeros(1, device=device)
    for batch in progress(batches, description, accelerator, rounds):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if normalize is not None and "images" in batch:
            batch["images"] = normalize(batch["images"])
        labels = batch["labels"]
        outputs = predict(batch)
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        batch_counts = torch.stack([topk_correct(o.float(), labels) for o in outputs])  # [heads, 2]
        counts = batch_counts if counts is None else counts + batch_counts
        total += labels.numel()
    if counts is None:
        counts = torch.zeros(1, 2, device=device)
    counts, total = _sum_over_ranks(counts, accelerator), _sum_over_ranks(total, accelerator)
    n = int(total.item())
    return [{"top1": 100.0 * float(c[0]) / max(n, 1), "top5": 100.0 * float(c[1]) / max(n, 1), "num_samples": n}
            for c in counts]


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, queries: torch.Tensor, *,
                num_classes: int, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """DINO's weighted k-NN classifier (Caron et al. 2021, §4.1 and their eval_knn.py): cosine
    similarity of L2-normalised features, the k nearest training samples vote for their label
    with weight exp(similarity / temperature). Returns class scores [Q, num_classes]."""
    with torch.autocast(queries.device.type, enabled=False):  # fp32 similarities, whatever the caller's autocast
        return _knn_votes(train_features, train_labels, queries, num_classes, k, temperature, chunk)


def _knn_votes(train_features, train_labels, queries, num_classes, k, temperature, chunk):
    bank = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        similarity, index = (q @ bank.T).topk(min(k, bank.shape[0]), dim=1)     # [q, k]
        weights = (similarity / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes, device=queries.device)


@torch.no_grad()
def knn_accuracy(features: Callable[[torch.Tensor], torch.Tensor], train_batches: Iterable[dict],
                 val_batches: Iterable[dict], *, num_classes: int, device, normalize=None, accelerator=None,
                 k: int = 20, temperature: float = 0.07, rounds: Rounds = None) -> dict:
    """Top-1 / top-5 of the k-NN classifier on the validation split, the training split as memory."""
    bank, bank_labels, _ = extract_features(features, train_batches, device=device, normalize=normalize,
                                            accelerator=accelerator, description="k-NN: features of the memory",
                                            rounds=rounds)
    results = evaluate(lambda batch: knn_predict(bank, bank_labels, features(batch["images"]), num_classes=num_classes,
                                                 k=k, temperature=temperature),
                       val_batches, device=device, normalize=normalize, accelerator=accelerator,
                       description="k-NN: classifying data.val", rounds=rounds)[0]
    return {**results, "k": k, "temperature": temperature, "num_train_samples": int(bank.shape[0])}


def knn_evaluate(encoder, cfg, accelerator, normalize, num_classes: int, features=None, rounds: Rounds = None) -> dict:
    """The k-NN protocol on a recipe's splits for an encoder's pooled features (what its head would
    read; `features(images)`, by default the encoder's own): data.train as memory, data.val as
    queries, eval.knn_k and eval.knn_temperature. The monitor inside training (the task's `features`)
    and tools/knn.py both run this."""
    batch_size = cfg.eval.batch_size or cfg.data.batch_size
    train, val = (build_eval_loader(cfg, split, rank=accelerator.process_index, world_size=accelerator.num_processes,
                                    batch_size=batch_size) for split in ("train", "val"))
    was_training = encoder.training
    encoder.eval()
    try:
        with accelerator.autocast():
            features = features or (lambda x: encoder.forward_head(encoder.forward_features(x), pre_logits=True))
            return knn_accuracy(features, train, val, num_classes=num_classes, device=accelerator.device, normalize=normalize,
                                accelerator=accelerator, k=cfg.eval.knn_k, temperature=cfg.eval.knn_temperature,
                                rounds=rounds)
    finally:
        encoder.train(was_training)
