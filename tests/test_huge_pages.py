"""Decoding weights moved into huge pages: the same values and Parameters, one aligned buffer,
advised to the kernel, and plain memory where the system has no transparent huge pages."""

from __future__ import annotations

import dataclasses
import mmap
from pathlib import Path

import pytest
import torch

from llmcli.generate.decode import prepare_model, sample
from llmcli.model import huge_pages
from llmcli.model.gpt import build_model
from llmcli.recipe import GenerateConfig, ModelConfig

CFG = ModelConfig(vocab_size=300, context_length=24, d_model=96, num_blocks=2, num_heads=4,
                  dropout=0.0)


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return fields


@pytest.fixture
def needs_huge_pages():
    if not huge_pages.available():
        pytest.skip("no transparent huge pages on this system (THP 'never' or not Linux)")


def test_weights_move_into_one_aligned_advised_buffer(needs_huge_pages):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, tie_embeddings=True)).eval()
    params = dict(model.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    assert huge_pages.move_weights_to_huge_pages(model)
    after = dict(model.named_parameters())
    assert all(after[name] is params[name] for name in params)  # the same Parameter objects
    assert all(torch.equal(after[name], before[name]) for name in params)
    assert model.lm_head.weight is model.tok_emb.weight
    starts = sorted(p.data_ptr() for p in model.parameters())
    ends = sorted(p.data_ptr() + p.numel() * p.element_size() for p in model.parameters())
    assert starts[0] % huge_pages.PAGE == 0
    assert ends[-1] - starts[0] < sum(p.numel() * p.element_size() + 64
                                      for p in model.parameters())  # one packed buffer
    smaps = mapping_of(starts[0])
    assert "hg" in smaps["VmFlags"].split()  # advised: MADV_HUGEPAGE
    assert mapping_of(ends[-1] - 1) == smaps  # the whole buffer is one mapping


def test_prepared_model_decodes_as_before(needs_huge_pages):
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    g = dataclasses.replace(GenerateConfig(), strategy="greedy", max_new_tokens=12)
    model.native_decode = False
    plain = sample(model, [3, 1, 4], g)[0]
    prepare_model(model)
    assert "hg" in mapping_of(model.tok_emb.weight.data_ptr())["VmFlags"].split()
    assert sample(model, [3, 1, 4], g)[0].tokens == plain.tokens


def test_without_huge_pages_memory_is_plain(monkeypatch):
    monkeypatch.setattr(huge_pages, "available", lambda: False)
    buffer = huge_pages.huge_page_buffer(1000)
    assert buffer.dtype == torch.uint8 and buffer.numel() == 1000
    model = build_model(CFG)
    pointer = model.tok_emb.weight.data_ptr()
    assert not huge_pages.move_weights_to_huge_pages(model)
    assert model.tok_emb.weight.data_ptr() == pointer


def test_only_cpu_models_move():
    layer = torch.nn.Linear(4, 4, device="meta")
    assert not huge_pages.move_weights_to_huge_pages(layer)
    assert not huge_pages.move_weights_to_huge_pages(torch.nn.ReLU())  # nothing to move


def test_the_setting_never_switches_it_off(monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    setting.write_text("always madvise [never]\n")
    assert not huge_pages.available()
    setting.write_text("always [madvise] never\n")
    assert huge_pages.available() == hasattr(mmap, "MADV_HUGEPAGE")
    setting.unlink()
    assert not huge_pages.available()


def test_a_refused_mapping_gives_plain_memory(monkeypatch, needs_huge_pages):
    def refuse(*args, **kwargs):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(mmap, "mmap", refuse)
    buffer = huge_pages.huge_page_buffer(4096)
    assert buffer.numel() == 4096 and buffer.dtype == torch.uint8
