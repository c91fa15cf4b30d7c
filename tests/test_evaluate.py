"""Evaluation protocols and the classification tasks, against hand-written references."""
import pytest
import torch
import torch.nn.functional as F

from ssl_vit import recipes, create_encoder
from ssl_vit.eval import evaluate, knn_predict, topk_correct
from ssl_vit.run.optim import build_optimizer, set_lr
from ssl_vit.tasks.param_groups import param_groups
from ssl_vit.tasks import Classify, LinearProbe, build_mixup

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)


def test_topk_and_evaluate_count_by_hand():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],
                           [-1.0, 0.0, 0.0, 0.1, 0.2, 0.7]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(logits, labels).tolist() == [1.0, 2.0]  # sample 3's label 0 is 6th: not in the top 5
    batches = [{"images": torch.zeros(2, 1), "labels": labels[:2]}, {"images": torch.zeros(1, 1), "labels": labels[2:]}]
    outputs = iter([logits[:2], logits[2:]])
    result = evaluate(lambda x: next(outputs), batches, device="cpu")[0]
    assert result == {"top1": pytest.approx(100 / 3), "top5": pytest.approx(200 / 3), "num_samples": 3}


def test_knn_matches_a_loop_over_queries():
    torch.manual_seed(0)
    bank, labels, queries = torch.randn(50, 8), torch.randint(0, 4, (50,)), torch.randn(7, 8)
    scores = knn_predict(bank, labels, queries, num_classes=4, k=5, temperature=0.1, chunk=3)
    for q in range(7):
        sims = torch.stack([F.cosine_similarity(queries[q], bank[i], dim=0) for i in range(50)])
        expected = torch.zeros(4)
        for i in sims.argsort(descending=True)[:5]:
            expected[labels[i]] += torch.exp(sims[i] / 0.1)
        assert torch.allclose(scores[q], expected, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in a bf16 run: the vote stays in fp32
        assert torch.equal(knn_predict(bank, labels, queries, num_classes=4, k=5, temperature=0.1, chunk=3), scores)


def test_layer_decay_gives_each_block_its_lr():
    """timm's layer-decay groups through the task's own group_matcher: block i gets
    lr x decay^(depth - i), the embeddings decay^(depth + 1), the head and fc_norm the full lr."""
    cfg = recipes.load(["recipe=finetune_digits", "optim.layer_decay=0.65", "model.depth=4"])
    task = Classify(create_encoder("vit_tiny_patch16", num_classes=10, global_pool="avg", **TINY))
    optimizer = build_optimizer(cfg.optim, task)
    set_lr(optimizer, 1.0)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(task.named_parameters())
    for i in range(4):
        assert lr_of[id(named[f"encoder.blocks.{i}.mlp.fc1.weight"])] == pytest.approx(0.65 ** (4 - i))
    assert lr_of[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(0.65 ** 5)
    assert lr_of[id(named["encoder.pos_embed"])] == pytest.approx(0.65 ** 5)
    for name in ("encoder.head.weight", "encoder.fc_norm.weight"):
        assert lr_of[id(named[name])] == pytest.approx(1.0)
    # and no weight decay on biases, norms, tokens and position embeddings
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay_of[id(named["encoder.pos_embed"])] == 0 and decay_of[id(named["encoder.cls_token"])] == 0
    assert decay_of[id(named["encoder.blocks.0.norm1.weight"])] == 0
    assert decay_of[id(named["encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.05)


def test_layer_decay_without_a_group_matcher_is_refused():
    wrapper = torch.nn.Sequential(create_encoder("vit_tiny_patch16", **TINY))
    with pytest.raises(ValueError, match="group_matcher"):
        param_groups(wrapper, 0.05, layer_decay=0.65)


def test_linear_probe_trains_only_its_heads():
    cfg = recipes.load(["recipe=linprobe_digits", "task.lr_scales=[1,10]"])
    encoder = create_encoder("vit_tiny_patch16", **TINY)
    probe = LinearProbe(encoder, 10, lr_scales=[1, 10])
    optimizer = build_optimizer(cfg.optim, probe)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in probe.heads.parameters() if p.requires_grad}
    assert type(optimizer).__name__ == "Lars"
    set_lr(optimizer, 0.5)
    assert sorted({g["lr"] for g in optimizer.param_groups}) == [0.5, 5.0]
    assert {g["always_adapt"] for g in optimizer.param_groups if g["params"][0].ndim == 1} == {False}
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    probe.train()
    assert not probe.encoder.training
    for _ in range(3):
        out = probe({"images": torch.randn(8, 3, 32, 32), "labels": torch.randint(0, 10, (8,))})
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert all(p.grad is None for p in encoder.parameters())


def test_folded_head_equals_batchnorm_and_linear():
    probe = LinearProbe(create_encoder("vit_tiny_patch16", **TINY), 5, lr_scales=[1.0])
    probe.train()
    for _ in range(3):  # give the BatchNorm real running statistics
        probe.heads[0](torch.randn(16, 32) * 3 + 1)
    probe.eval()
    features = torch.randn(4, 32)
    with torch.no_grad():
        assert torch.allclose(probe.folded_head(0)(features), probe.heads[0](features), atol=1e-5)


def test_classify_losses():
    encoder = create_encoder("vit_tiny_patch16", num_classes=4, **TINY)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = Classify(encoder, label_smoothing=0.1)
    logits = encoder(images)
    smoothed = -(0.9 * F.log_softmax(logits, 1)[torch.arange(4), labels] + 0.1 * F.log_softmax(logits, 1).mean(1))
    assert plain({"images": images, "labels": labels}).loss.item() == pytest.approx(smoothed.mean().item(), rel=1e-5)
    cfg = recipes.load(["recipe=finetune_base"])  # mixup 0.8, cutmix 1.0, smoothing 0.1
    mixed = Classify(encoder, mixup=build_mixup(cfg.task, 4), head_init_std=None).train()
    torch.manual_seed(0)
    out = mixed({"images": images, "labels": labels})
    assert torch.isfinite(out.loss) and "train_top1" not in out.metrics  # soft targets: no accuracy
    assert abs(encoder.head.weight.std().item()) > 1e-3  # head_init_std=None keeps the head as it was


def test_new_head_initialisation():
    encoder = create_encoder("vit_tiny_patch16", num_classes=1000, **{**TINY, "embed_dim": 64})
    Classify(encoder, head_init_std=2e-5)
    assert encoder.head.weight.std().item() == pytest.approx(2e-5, rel=0.2) and torch.all(encoder.head.bias == 0)


@pytest.mark.parametrize("recipe", ["linprobe_digits", "finetune_digits"])
def test_digits_recipes_use_the_mae_tiny_digits_encoder(recipe):
    """init=random must build the same architecture the MAE digits encoder has (a fair baseline)."""
    keys = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans", "mlp_ratio")
    mae, other = recipes.load(["recipe=mae_tiny_digits"]), recipes.load([f"recipe={recipe}"])
    assert {k: mae.model[k] for k in keys} == {k: other.model[k] for k in keys}
    assert list(mae.data.mean) == list(other.data.mean) and list(mae.data.std) == list(other.data.std)
