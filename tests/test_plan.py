"""agentpeft plan: exact peft parameter counts from a meta-device model, and a memory estimate."""

import json

import pytest
from click.testing import CliRunner

from agentpeft.cli import cli
from agentpeft.errors import AgentpeftError
from agentpeft.plan import plan

MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
              "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
              "tie_word_embeddings": False}
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "tie_word_embeddings": False}


def _folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_mistral_7b_lora_r16_counts_match_peft(tmp_path):
    result = CliRunner().invoke(cli, ["plan", "--base", str(_folder(tmp_path, "mistral", MISTRAL_7B)),
                                      "--method", "lora", "--r", "16", "--target-modules", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == \
        "trainable params: 6,815,744 || all params: 7,248,547,840 || trainable%: 0.0940"
    assert "total" in result.output and "GiB" in result.output


def test_llama2_7b_lora_r8_counts_match_peft(tmp_path):
    result = plan(str(_folder(tmp_path, "llama2", LLAMA2_7B)), "lora", r=8, target_modules=["q_proj", "v_proj"])
    assert (result.trainable_params, result.all_params) == (4_194_304, 6_742_609_920)
    assert result.peft_line() == "trainable params: 4,194,304 || all params: 6,742,609,920 || trainable%: 0.0622"


def test_memory_estimate_follows_the_method_and_batch(tmp_path):
    folder = str(_folder(tmp_path, "llama2", LLAMA2_7B))
    qlora = plan(folder, "qlora", r=8, target_modules=["q_proj", "v_proj"], device="cuda", dtype="bfloat16")
    lora = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], device="cuda", dtype="bfloat16")
    full = plan(folder, "full", device="cuda", dtype="bfloat16")
    # 4-bit NF4 with double quantization: a little over half a byte per quantized weight.
    assert 0.51 < qlora.components["weights_4bit"] / 6.48e9 < 0.54
    assert lora.components["weights"] == 2 * (6_742_609_920 - 4_194_304)
    assert lora.components["optimizer"] == 8 * 4_194_304  # two fp32 AdamW states per trainable parameter
    assert full.components["optimizer"] == 2 * 2 * 6_738_415_616
    assert qlora.total_bytes < lora.total_bytes < full.total_bytes
    # Dequantized once: the quantized weights in fp32 instead of NF4, no per-call dequantization buffer.
    dense = plan(folder, "qlora", r=8, target_modules=["q_proj", "v_proj"], dequantize_once=True, dtype="float32")
    nf4 = plan(folder, "qlora", r=8, target_modules=["q_proj", "v_proj"], dtype="float32")
    assert "weights_4bit" not in dense.components and "dequant_buffer" not in dense.components
    assert 3.9 < dense.components["weights_dequantized"] / 6.48e9 < 4.1
    # On a CPU, weights converted from the checkpoint's dtype sit beside its memory-mapped pages.
    cpu_fp32 = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], dtype="float32")
    cpu_bf16 = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], dtype="bfloat16")
    assert "checkpoint_mapping" not in cpu_fp32.components
    assert cpu_bf16.components["checkpoint_mapping"] == 2 * cpu_bf16.components["weights"]
    # Under train.bf16 the dequantized copy's linear layers are bf16.
    assert plan(folder, "qlora", r=8, target_modules=["q_proj", "v_proj"], dequantize_once=True,
                dtype="bfloat16").components["weights_dequantized"] == dense.components["weights_dequantized"] / 2
    assert dense.total_bytes - nf4.total_bytes == pytest.approx(
        dense.components["weights_dequantized"] - nf4.components["weights_4bit"] - nf4.components["dequant_buffer"])
    longer = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], seq_len=512, device="cuda",
                  dtype="bfloat16")
    assert longer.components["activations"] == 2 * lora.components["activations"]
    checkpointed = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], device="cuda", dtype="bfloat16",
                        gradient_checkpointing=True)
    assert checkpointed.components["activations"] < lora.components["activations"] / 5


def test_gradients_and_activations_do_not_peak_together_without_accumulation(tmp_path):
    folder = str(_folder(tmp_path, "llama2", LLAMA2_7B))
    every = 2 * 6_738_415_616  # bf16 gradients of every weight
    head = 2 * 32000 * 4096  # lm_head (untied): its gradients come first in backward
    full = plan(folder, "full", device="cuda", dtype="bfloat16", batch_size=16, seq_len=2048)
    assert full.components["activations"] > every and full.components["gradients"] == head
    accumulating = plan(folder, "full", device="cuda", dtype="bfloat16", batch_size=16, seq_len=2048, grad_accum=4)
    assert accumulating.components["gradients"] == every
    assert accumulating.total_bytes - full.total_bytes == every - head
    # With checkpointing the activations are small: the peak is every gradient, at the end of backward.
    checkpointed = plan(folder, "full", device="cuda", dtype="bfloat16", gradient_checkpointing=True)
    assert checkpointed.components["gradients"] + checkpointed.components["activations"] == every
    lora = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"], device="cuda", dtype="bfloat16")
    assert lora.components["gradients"] == 0  # a frozen head; each adapter's gradients replace its activations
    result = CliRunner().invoke(cli, ["plan", "--base", folder, "--grad-accum", "0"])
    assert result.exit_code != 0 and "--grad-accum" in result.output and "Traceback" not in result.output


def test_dtype_auto_plans_what_training_computes_in(tmp_path, monkeypatch):
    from agentpeft import models

    folder = str(_folder(tmp_path, "llama2", LLAMA2_7B))
    for native, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(models, "cpu_bf16_supported", lambda: native)
        auto = plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"])
        assert auto.dtype == expected
        assert auto.components == plan(folder, "lora", r=8, target_modules=["q_proj", "v_proj"],
                                       dtype=expected).components
        assert plan(folder, "lora", device="cuda").dtype == "bfloat16"
        result = CliRunner().invoke(cli, ["plan", "--base", folder, "--method", "lora"])
        assert result.exit_code == 0 and f"cpu, {expected})" in result.output


def test_python_api_and_json_output(tmp_path, tiny_base):
    import agentpeft

    assert agentpeft.plan(str(tiny_base), "full").trainable_params == agentpeft.plan(str(tiny_base), "full").all_params
    result = CliRunner().invoke(cli, ["plan", "--base", str(tiny_base / "config.json"), "--json"])
    data = json.loads(result.output)
    assert data["method"] == "qlora" and data["total_bytes"] == sum(data["components"].values())


def test_bad_base_and_modules_are_one_line_errors(tmp_path, home):
    runner = CliRunner()
    result = runner.invoke(cli, ["plan", "--base", str(tmp_path)])
    assert result.exit_code == 1 and "has no config.json" in result.output
    result = runner.invoke(cli, ["plan", "--base", "smollm2-135m"])
    assert result.exit_code == 1 and "agentpeft models pull smollm2-135m" in result.output
    result = runner.invoke(cli, ["plan", "--base", "nobody/no-such-model-xyz"])
    assert result.exit_code == 1 and "local Hugging Face cache" in result.output
    with pytest.raises(AgentpeftError, match="--target-modules"):
        plan(str(_folder(tmp_path, "llama2", LLAMA2_7B)), "lora", target_modules=["nonexistent_proj"])
