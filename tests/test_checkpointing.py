"""train.checkpoint_activations: the same gradients (and so the same training) with less memory."""

import pytest
import torch

import zoo
from tests.test_mar import tiny_mar
from tests.test_mfdit import TINY as MFDIT_TINY
from tests.test_var import randomize, teacher_forcing_batch, tiny_tokenizer, tiny_var
from zoo.recipe import load_recipe
from zoo.train import Trainer


def gradients(model, loss_fn, checkpointing):
    model.checkpoint_activations = checkpointing
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the loss's noise, timesteps, masks and dropout
    loss_fn(model)["loss"].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def randomized(model, scale=0.05):
    torch.manual_seed(3)
    with torch.no_grad():  # leave the zero init so that every weight gets a gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.train()


def dit():
    return randomized(zoo.create_model("dit-s/2", input_size=8, in_channels=1, hidden_size=32, depth=2,
                                       num_heads=2, num_classes=10))


def dit_loss(model):
    return model.loss(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3]))


def mfdit_loss(model):
    return model.loss(torch.randn(4, 1, 8, 8).clamp(-1, 1), torch.tensor([0, 1, 2, 3]))


VAR_BATCH = teacher_forcing_batch(tiny_tokenizer())


def var_loss(model):
    return model.loss(VAR_BATCH, torch.tensor([1, 2, 3]))


def mar_loss(model):
    return model.loss(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))


CASES = {
    "dit": (dit, dit_loss),
    "mfdit": (lambda: randomized(zoo.create_model("mfdit-s/2", **MFDIT_TINY)), mfdit_loss),
    "var": (lambda: randomize(tiny_var(drop_path_rate=0.1, attn_drop_rate=0.1)).train(), var_loss),
    "mar": (lambda: randomized(tiny_mar(attn_dropout=0.1, proj_dropout=0.1)), mar_loss),
}


@pytest.mark.parametrize("family", CASES)
def test_checkpointed_blocks_give_the_same_gradients(family):
    build, loss_fn = CASES[family]
    model = build()
    plain = gradients(model, loss_fn, False)
    checkpointed = gradients(model, loss_fn, True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:  # recomputation repeats the same arithmetic: equal up to the last bit or two
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-8, msg=name)


def test_the_recipe_switch_trains_to_the_same_weights(tiny_recipe_file, tmp_path):
    runs = {}
    for flag in (False, True):
        trainer = Trainer(load_recipe(tiny_recipe_file, [f"train.checkpoint_activations={flag}"]),
                          tmp_path / str(flag), progress=False, cpu=True)
        assert trainer.generator.checkpoint_activations is flag
        trainer.fit()
        runs[flag] = trainer.generator.state_dict()
    for key in runs[False]:
        torch.testing.assert_close(runs[True][key], runs[False][key], rtol=1e-5, atol=1e-7, msg=key)


def test_a_model_without_blocks_to_checkpoint_is_refused(tmp_path):
    import copy

    from tests.test_tokenizer_runs import TOKENIZER_RECIPE
    from zoo.config import ConfigError
    from zoo.recipe import recipe_from_dict

    raw = copy.deepcopy(TOKENIZER_RECIPE)  # trains the msvq tokenizer, a convolutional network
    raw.setdefault("train", {})["checkpoint_activations"] = True
    with pytest.raises(ConfigError, match="train.checkpoint_activations: MSVQTokenizer does not support"):
        Trainer(recipe_from_dict(raw, source="msvq.yaml"), tmp_path / "run", progress=False, cpu=True)


def test_return_freed_memory_fixes_glibcs_mmap_threshold_on_a_cpu(tiny_recipe_file, tmp_path, monkeypatch):
    from zoo.train import trainer as trainer_module

    calls = []
    monkeypatch.setattr(trainer_module, "fix_mmap_threshold", lambda: calls.append("mallopt") or True)
    Trainer(load_recipe(tiny_recipe_file), tmp_path / "a", progress=False, cpu=True)
    assert calls == []
    Trainer(load_recipe(tiny_recipe_file, ["train.return_freed_memory=true"]), tmp_path / "b", progress=False,
            cpu=True)
    assert calls == ["mallopt"]
