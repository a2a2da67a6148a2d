"""Speed options of the train stage keep training correct: padding-free batches do not mix examples."""

import pytest
import torch

from agentpeft.models import load_model, load_tokenizer
from agentpeft.pipeline.dataset import build_dataset
from agentpeft.pipeline.ingest import ingest
from agentpeft.pipeline.train import train
from agentpeft.recipe import configure


def test_packed_row_with_position_ids_equals_separate_rows(tiny_base):
    # What padding_free relies on: TRL passes use_cache=False in training, and without a cache transformers
    # reads sequence boundaries from position_ids and masks attention block-diagonally.
    model = load_model(tiny_base)
    torch.manual_seed(0)
    a, b = torch.randint(3, 500, (1, 7)), torch.randint(3, 500, (1, 5))
    with torch.no_grad():
        separate = torch.cat([model(input_ids=a).logits, model(input_ids=b).logits], dim=1)
        packed = model(input_ids=torch.cat([a, b], dim=1),
                       position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None], use_cache=False).logits
        contaminated = model(input_ids=torch.cat([a, b], dim=1)).logits
    assert torch.allclose(packed, separate, atol=1e-5)
    assert not torch.allclose(contaminated[:, 7:], separate[:, 7:], atol=1e-3)  # the check can fail


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_padding_free_training_runs(method, tiny_base, tmp_path):
    recipe = configure("support-bot", max_steps=2, batch_size=4, method=method, padding_free=True)
    data = build_dataset(ingest(recipe.kb_path), ["faq"], load_tokenizer(tiny_base), recipe.system_prompt,
                         tmp_path / "data", train_phrasings=1).path
    result = train(tiny_base, data, tmp_path / "run", recipe.train, log=lambda s: None)
    assert result.steps == 2 and result.final_loss > 0
