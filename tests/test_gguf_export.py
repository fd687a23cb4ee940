"""GGUF export, checked by the programs that read it: llama.cpp (llama-cpp-python, installed by `make llama-cpp`)
loads the files and answers, and Go's text/template renders the Modelfile's templates (tests/gotemplate)."""

import errno
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import varied_rows, write_jsonl

from loratune.cli import main
from loratune.data.encode import BUILTIN_TEMPLATES, Encoder
from loratune.inference.export import export_gguf

GO_RENDERER = Path(__file__).parent / "gotemplate" / "main.go"
TEXT = "Hi, this is Priya Patel. Could you send 12 blue mugs to Leeds by Friday? Thanks!\n\n  I'll pay 1234.5 €"


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed; `make llama-cpp` builds it once and caches the wheel"
    )


def go_render(cases: list[dict]) -> list[str]:
    """Each case's Go template rendered by Go's text/template, with .Messages as Ollama passes them."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go); it renders the Modelfile templates")
    result = subprocess.run(
        ["go", "run", str(GO_RENDERER)], input=json.dumps(cases), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def load(llama_cpp, path, **options):
    """One thread: llama.cpp's threads wait for each other by spinning, so on a machine busy with other work two
    threads are several times slower than one."""
    return llama_cpp.Llama(str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False, seed=0, **options)


def logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


# --- The Modelfile's Go templates render the prompts training used ----------------------------------------------


def _smollm2_template() -> str:
    """The built-in model's own chat template, as its GGUF file stores it."""
    from importlib import metadata

    from gguf import GGUFReader

    from loratune.modeling.model import BUILTIN_MODELS

    spec = BUILTIN_MODELS["smollm2-135m"]
    path = metadata.distribution(spec.package).locate_file(spec.file)
    return GGUFReader(path).fields["tokenizer.chat_template"].contents()


QWEN_LIKE = (  # ChatML with a default system message, as Qwen2 and SmolLM2 write it
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATIONS = [
    [  # two turns, as in a quickstart example
        {"role": "user", "content": "Extract the order as JSON.\n\nMessage: 12 blue mugs to Leeds by Friday"},
        {"role": "assistant", "content": '{"item": "blue mugs", "quantity": 12}'},
        {"role": "user", "content": "And for Porto?"},
        {"role": "assistant", "content": '{"city": "Porto"}'},
    ],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
]


def _family_template(name: str) -> str:
    """A family's chat template from tests/chat_templates (see its README), without the answer marks."""
    marks = re.compile(r"\s*\{%-\s*(?:end)?generation\s*-%\}\s*")
    return marks.sub("", (Path(__file__).parent / "chat_templates" / f"{name}.jinja").read_text())


@pytest.mark.parametrize(
    "name", ["chatml", "plain", "alpaca", "smollm2", "qwen-like", "gemma2", "gemma3", "phi3", "phi3_5", "phi4",
             "phi4_mini"]
)  # fmt: skip
def test_modelfile_template_renders_like_the_chat_template_in_go(name):
    from loratune.data.formats import RowError
    from loratune.inference.export.modelfile import PROBES, go_template
    from loratune.modeling.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    own = {"smollm2": _smollm2_template, "qwen-like": lambda: QWEN_LIKE}
    template = own[name]() if name in own else BUILTIN_TEMPLATES.get(name) or _family_template(name)
    go = go_template(tokenizer, template)
    assert go is not None
    conversations = CONVERSATIONS + PROBES
    for turns in (2, 3):  # the two-turn conversation up to its second answer, and up to the second question
        conversations.append(CONVERSATIONS[0][:turns])
    encoder = Encoder(tokenizer, template)  # training's rendering
    expected = {}
    for i, c in enumerate(conversations):
        try:
            expected[i] = encoder.render(c, add_generation_prompt=c[-1]["role"] != "assistant")
        except RowError:  # a conversation the template refuses (Gemma 2's system turn) is never trained on
            continue
    assert all(i in expected for i, c in enumerate(conversations) if c[0]["role"] != "system")
    rendered = go_render([{"template": go, "messages": conversations[i]} for i in expected])
    assert rendered == list(expected.values())


def test_a_template_with_no_translation_is_left_to_the_gguf():
    from loratune.inference.export.modelfile import go_template, modelfile
    from loratune.modeling.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    llama3_like = (
        "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] "
        "+ '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
        "<|end_header_id|>\n\n' }}{% endif %}"
    )
    assert go_template(tokenizer, llama3_like) is None
    text = modelfile("./m.gguf", None, ("<|eot_id|>",))
    assert "TEMPLATE" not in text.replace("no TEMPLATE", "") and "template stored in the GGUF" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and "FROM ./m.gguf" in text


# --- Tiny models of each supported family: llama.cpp computes what transformers computes -----------------------


_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
# Window, caps and rotary settings small enough to matter on TEXT (about 40 tokens).
_GEMMA = {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8}
FAMILY_CONFIGS = {  # family -> (transformers model type, settings beyond the shared tiny ones)
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # a head size other than hidden / heads
    "llama3-rope": ("llama", {"attention_bias": True, "rope_scaling": _LLAMA3_ROPE, "rope_theta": 500000.0}),
    "mistral-nemo": ("mistral", {"head_dim": 32, "sliding_window": None}),  # Nemo's head size is not hidden / heads
    "gemma2": (
        "gemma2",
        {**_GEMMA, "tie_word_embeddings": True, "attn_logit_softcapping": 4.0, "final_logit_softcapping": 3.0},
    ),
    "gemma3": (  # six layers: five local, then a global one, whose rotary base and scaling differ
        "gemma3_text",
        {
            **_GEMMA,
            "num_hidden_layers": 6,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            },
        },
    ),
    "phi3-longrope": (  # Phi-3/3.5's long-context layout, used beyond its original context (16 < TEXT's length)
        "phi3",
        {
            "original_max_position_embeddings": 16,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "original_max_position_embeddings": 16,
                "long_factor": [1.0, 3.0, 9.0, 27.0],
                "short_factor": [1.0, 1.5, 2.0, 2.5],
            },
        },
    ),
    "phi4-mini": (  # Phi-4-mini: three quarters of each head rotated, output tied to the embedding
        "phi3",
        {"tie_word_embeddings": True, "rope_parameters": {"rope_theta": 250000.0, "partial_rotary_factor": 0.75}},
    ),
}


def _tiny_family(root: Path, family: str) -> Path:
    """A tiny random model of `family`, trained a few steps so the adapter changes it; returns the run folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loratune import TrainConfig, train
    from loratune.modeling.tiny import make_tokenizer

    tokenizer = make_tokenizer()
    if family == "gemma3":  # a Gemma-style tokenizer (SentencePiece pieces, <bos> first) and chat template
        from loratune.inference.export.vocab import SENTENCEPIECE_STYLES

        tokenizer = _sentencepiece_like(*SENTENCEPIECE_STYLES[1][:2], bos=True)
        tokenizer.chat_template = _family_template("gemma3")
    model_type, extra = FAMILY_CONFIGS[family]
    settings = {
        "vocab_size": len(tokenizer) + 8,  # an embedding padded past the tokenizer, as Qwen's is
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,  # spread-out logits, so that a wrong layout shows
        "tie_word_embeddings": family == "qwen2",
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = AutoConfig.for_model(model_type, **{**settings, **extra})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    train(
        TrainConfig(
            model=str(root / "model"),
            train_data=write_jsonl(root / "train.jsonl", varied_rows(16)),
            output_dir=str(root / "run"),
            max_steps=3,
            batch_size=4,
            gradient_accumulation_steps=1,
            precision="fp32",
            device="cpu",
            learning_rate=1e-2,
            max_length=256,
        )
    )
    return root / "run"


@pytest.fixture(scope="module", params=["llama", *FAMILY_CONFIGS])
def family_run(request, tiny_run, tmp_path_factory):
    return tiny_run if request.param == "llama" else _tiny_family(tmp_path_factory.mktemp(request.param), request.param)


def _base_gguf(run: Path, tmp_path: Path) -> Path:
    """The run's base alone as GGUF: the run with its adapter's B matrices zeroed (B·A = 0), exported merged."""
    from safetensors.torch import load_file, save_file

    base_run = tmp_path / "base-run"
    shutil.copytree(run, base_run)
    weights = base_run / "adapter" / "adapter_model.safetensors"
    tensors = {k: torch.zeros_like(v) if ".lora_B." in k else v for k, v in load_file(weights).items()}
    save_file(tensors, weights)
    return export_gguf(base_run, tmp_path / "base-f16.gguf").path


def test_each_family_exports_to_a_file_llama_cpp_computes_like_transformers(family_run, llama_cpp, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratune.core.sources import read_run_config
    from loratune.modeling.model import load_tokenizer

    model_path = read_run_config(family_run).model
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, family_run / "adapter").eval()
    tokenizer = load_tokenizer(str(family_run / "adapter"))
    ids = tokenizer(TEXT).input_ids
    with torch.no_grad():
        expected = trained(torch.tensor([ids])).logits[0].numpy()
        with trained.disable_adapter():
            untrained = trained(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(expected - untrained).max() > 0.1  # the adapter matters, so matching it means something

    merged = export_gguf(family_run, tmp_path / "m-f16.gguf")
    adapter = export_gguf(family_run, tmp_path / "a-f16.gguf", adapter_only=True)
    base_file = _base_gguf(family_run, tmp_path)
    for options in ({"model": merged.path}, {"model": base_file, "lora_path": str(adapter.path)}):
        llm = load(llama_cpp, options.pop("model"), **options)
        try:
            assert llm.tokenize(TEXT.encode(), add_bos=True, special=True) == ids  # BOS where the tokenizer adds it
            got = logits(llm, ids)
        finally:
            llm.close()
        tolerance = 0.01 * np.abs(expected).max()
        assert np.abs(got - expected).max() < tolerance, (options, np.abs(got - expected).max(), tolerance)
        # The same next token wherever transformers' best leads the runner-up by more than the tolerance (closer
        # calls are f16's to decide: llama.cpp's weights and cache are f16, and its GELU comes from an f16 table).
        top2 = np.sort(expected, -1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > tolerance
        assert clear.mean() > 0.5 and (got.argmax(-1) == expected.argmax(-1))[clear].all()


@pytest.mark.parametrize("kind,tolerance", [("bf16", 0.02), ("q8_0", 0.03), ("q4_0", 0.15), ("q4_1", 0.15)])
def test_each_type_is_written_in_its_format_and_within_its_rounding(kind, tolerance, tiny_run, llama_cpp, tmp_path):
    from gguf import GGUFReader

    from loratune.inference.merge import merged_model
    from loratune.modeling.model import load_tokenizer

    ids = load_tokenizer(str(tiny_run / "adapter"))(TEXT).input_ids
    with torch.no_grad():
        expected = merged_model(tiny_run, dtype=torch.float32).model(torch.tensor([ids])).logits[0].numpy()
    path = export_gguf(tiny_run, tmp_path / f"m-{kind}.gguf", kind).path
    types = {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == kind.upper() and types["blk.0.attn_norm.weight"] == "F32"
    llm = load(llama_cpp, path)
    try:
        got = logits(llm, ids)
    finally:
        llm.close()
    assert np.abs(got - expected).max() < tolerance * np.abs(expected).max()


# --- The tokenizer: llama.cpp's pre-tokenizer of each name splits text as tokenizer.json says --------------------


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_each_known_pre_tokenizer_tokenizes_like_transformers_in_llama_cpp(name, llama_cpp, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from loratune.inference.export.arch import model_shape, write_hyperparameters
    from loratune.inference.export.vocab import PRE_TOKENIZERS, write_tokenizer
    from loratune.inference.export.writer import write_gguf
    from loratune.modeling.tiny import SPECIAL, corpus_lines

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    steps = [{**byte_level, **s} if s["type"] == "ByteLevel" else s for s in PRE_TOKENIZERS[name]]
    spec = {"type": "Sequence", "pretokenizers": steps} if len(steps) > 1 else steps[0]
    backend = json.loads(Tokenizer(models.BPE()).to_str())
    backend = Tokenizer.from_str(json.dumps({**backend, "pre_tokenizer": spec, "decoder": byte_level}))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIAL, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus_lines() + [TEXT, "1234567 naïve café 東京 DON'T we've"] * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<pad>")
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=128)  # fmt: skip
    shape = model_shape(config)

    def metadata(writer):
        write_hyperparameters(writer, config, shape)
        write_tokenizer(writer, tokenizer, str(tmp_path), len(tokenizer))
        writer.add_eos_token_id(tokenizer.eos_token_id)

    write_gguf(tmp_path / "vocab.gguf", "llama", metadata, [])
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    try:
        for text in (TEXT, "1234567 naïve café 東京 DON'T we've\n\n\n  x", "a  b\tc 42x<|im_end|>"):
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer(text).input_ids, text
    finally:
        llm.close()


def _sentencepiece_like(normalizer, pre_tokenizer, bos: bool = False):
    """A byte-fallback BPE tokenizer as transformers converts a SentencePiece model: spaces as ▁, the 256 bytes as
    <0xXX> tokens, and for each piece every split of it into two pieces as a merge, in the pieces' order. With
    `bos`, it starts each text with <bos>, as Gemma's does."""
    from tokenizers import Tokenizer, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from loratune.modeling.tiny import SPECIAL, corpus_lines

    special = ["<unk>", "<bos>", "<start_of_turn>", "<end_of_turn>", *SPECIAL]
    trained = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    trained.normalizer = normalizers.Replace(" ", "▁")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False)
    trained.train_from_iterator(corpus_lines() + [TEXT] * 3, trainer)
    learned = sorted(trained.get_vocab(), key=trained.token_to_id)
    pieces = learned[: len(special)] + [f"<0x{b:02X}>" for b in range(256)] + learned[len(special) :]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    merges = [
        (p[:k], p[k:]) for p in pieces[len(special) :] for k in range(1, len(p)) if {p[:k], p[k:]} <= vocab.keys()
    ]
    backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    spec = json.loads(backend.to_str())
    backend = Tokenizer.from_str(json.dumps({**spec, "normalizer": normalizer, "pre_tokenizer": pre_tokenizer}))
    backend.add_special_tokens(special)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="<unk>",
                                   pad_token="<pad>", bos_token="<bos>" if bos else None)  # fmt: skip


@pytest.mark.parametrize("style", range(3), ids=["gemma", "gemma-split", "llama2"])
def test_each_sentencepiece_style_tokenizes_like_transformers_in_llama_cpp(style, llama_cpp, tmp_path):
    from transformers import AutoConfig

    from loratune.inference.export.arch import model_shape, write_hyperparameters
    from loratune.inference.export.vocab import SENTENCEPIECE_STYLES, write_tokenizer
    from loratune.inference.export.writer import write_gguf

    normalizer, pre_tokenizer, _ = SENTENCEPIECE_STYLES[style]
    tokenizer = _sentencepiece_like(normalizer, pre_tokenizer)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=128)  # fmt: skip

    def metadata(writer):
        write_hyperparameters(writer, config, model_shape(config))
        write_tokenizer(writer, tokenizer, str(tmp_path), len(tokenizer))
        writer.add_eos_token_id(tokenizer.eos_token_id)

    write_gguf(tmp_path / "vocab.gguf", "llama", metadata, [])
    llm = llama_cpp.Llama(str(tmp_path / "vocab.gguf"), vocab_only=True, verbose=False)
    texts = (TEXT, " 1234567 naïve café 東京 DON'T we've\n\n\n  x", "a  b\tc 42x<|im_end|>",
             "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    try:
        for text in texts:
            ids = tokenizer(text).input_ids
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids, text
    finally:
        llm.close()
    assert any(t.startswith("<0x") for t in tokenizer.convert_ids_to_tokens(tokenizer(texts[1]).input_ids))


def test_an_unknown_pre_tokenizer_is_refused_not_guessed(tmp_path):
    from loratune.core.errors import UserError
    from loratune.inference.export.vocab import _pre_tokenizer_name, _space_prefix

    with pytest.raises(UserError, match="not one llama.cpp is known to reproduce"):
        _pre_tokenizer_name({"type": "Metaspace", "replacement": "▁"}, "m")
    metaspace = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}
    with pytest.raises(UserError, match="not a pair llama.cpp is known to reproduce"):
        _space_prefix({"normalizer": None, "pre_tokenizer": metaspace}, "m")


_GEMMA_OK = {"head_dim": 32, "query_pre_attn_scalar": 32}
_LOCAL_20K = {"rope_type": "default", "rope_theta": 20000.0}


@pytest.mark.parametrize(
    "model_type,settings,message",
    [
        ("gemma2", {"head_dim": 32}, "query_pre_attn_scalar 256 with 2 layers (llama.cpp scales queries by 1/sqrt(32)"),
        ("gemma2", {**_GEMMA_OK, "tie_word_embeddings": False}, "an output layer apart from the embedding"),
        ("gemma2", {**_GEMMA_OK, "hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
        ("gemma3_text", {**_GEMMA_OK, "final_logit_softcapping": 30.0}, "logit soft-capping"),
        ("gemma3_text", {**_GEMMA_OK, "layer_types": ["full_attention"] * 2}, "every 6th layer global"),
        ("gemma3_text", {**_GEMMA_OK, "rope_parameters": {"sliding_attention": _LOCAL_20K, "full_attention": {}}},
         "local rotary settings"),
        ("gemma3", {}, "model type 'gemma3': GGUF export supports"),  # Gemma 3's image-text models
        ("phi3", {"head_dim": 32}, "takes the head size as hidden_size / num_attention_heads"),
    ],
)  # fmt: skip
def test_what_llama_cpp_would_compute_otherwise_is_refused(model_type, settings, message):
    from transformers import AutoConfig

    from loratune.core.errors import UserError
    from loratune.inference.export.arch import model_shape

    shared = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100}  # fmt: skip
    config = AutoConfig.for_model(model_type, **({} if model_type == "gemma3" else shared), **settings)
    with pytest.raises(UserError, match=re.escape(message)):
        model_shape(config)


def test_a_sliding_window_llama_cpp_does_not_apply_bounds_the_context():
    from transformers import AutoConfig

    from loratune.inference.export.arch import context_length, model_shape

    for model_type, window, expected in (("mistral", 64, 64), ("mistral", None, 512), ("phi3", 48, 48)):
        config = AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                                      sliding_window=window)  # fmt: skip
        assert context_length(config, model_shape(config)) == expected
    gemma = AutoConfig.for_model("gemma2", hidden_size=64, num_attention_heads=4, head_dim=16,
                                 query_pre_attn_scalar=16, max_position_embeddings=512, sliding_window=64)  # fmt: skip
    assert context_length(gemma, model_shape(gemma)) == 512  # llama.cpp's gemma2 applies the window itself


# --- Bad input: one line, a non-zero exit, nothing written -------------------------------------------------------


def _refused(capsys, args: list[str], message: str) -> None:
    assert main(["export", *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def _copy_run(run: Path, tmp_path: Path, **settings) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    (copy / "config.yaml").write_text(yaml.safe_dump({**config, **settings}))
    return copy


def test_bad_input_is_one_line_and_leaves_nothing(tiny_run, tmp_path, capsys):
    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    out = tmp_path / "out" / "m.gguf"
    gguf = ["--format", "gguf", "--out", str(out)]
    _refused(capsys, [str(tmp_path), *gguf], "not a loratune run folder")
    no_adapter = _copy_run(tiny_run, tmp_path / "a")
    shutil.rmtree(no_adapter / "adapter")
    _refused(capsys, [str(no_adapter), *gguf], "no adapter here")
    _refused(capsys, [str(tiny_run), *gguf, "--type", "q4_k_m"], "llama-quantize")
    _refused(capsys, [str(tiny_run), *gguf, "--type", "q4_0", "--adapter-only"], "an adapter is exported as one of")

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=512)).save_pretrained(tmp_path / "gpt2")
    _refused(capsys, [str(_copy_run(tiny_run, tmp_path / "b", model=str(tmp_path / "gpt2"))), *gguf],
             "model type 'gpt2': GGUF export supports Llama")  # fmt: skip
    AutoConfig.for_model("gemma2", hidden_size=64, num_attention_heads=4, head_dim=32).save_pretrained(tmp_path / "g")
    _refused(capsys, [str(_copy_run(tiny_run, tmp_path / "g2", model=str(tmp_path / "g"))), *gguf],
             "'gemma2': query_pre_attn_scalar 256")  # fmt: skip
    if not torch.cuda.is_available():  # 4-bit weights cannot be dequantised for merging without a CUDA GPU
        _refused(capsys, [str(_copy_run(tiny_run, tmp_path / "c", load_in_4bit=True)), *gguf], "trained in 4-bit")
    assert not out.parent.exists() or not any(out.parent.iterdir())

    assert main(["export", str(tiny_run), *gguf]) == 0
    written = out.read_bytes()
    _refused(capsys, [str(tiny_run), *gguf, "--type", "q8_0"], "already exists; choose another --out or pass")
    assert out.read_bytes() == written
    assert main(["export", str(tiny_run), *gguf, "--type", "q8_0", "--overwrite"]) == 0
    assert out.read_bytes() != written and sorted(p.name for p in out.parent.iterdir()) == ["m.Modelfile", "m.gguf"]


def test_a_full_disk_leaves_no_half_written_file(tiny_run, tmp_path, capsys, monkeypatch):
    from gguf import GGUFWriter

    def full(self, tensor, *args, **kwargs):
        self.fout[0].write(b"x" * 1000)  # part of a tensor reached the disk, then the disk was full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(GGUFWriter, "write_tensor_data", full)
    _refused(capsys, [str(tiny_run), "--format", "gguf", "--out", str(tmp_path / "m.gguf")], "disk full while writing")
    assert list(tmp_path.iterdir()) == []


# --- The built-in model, trained on the quickstart task, answered by llama.cpp -----------------------------------

# A shorter quickstart (64 examples at a higher learning rate): the adapter takes held-out exact match from 0 to most.
SHORT_QUICKSTART = {"test_data": None, "max_steps": 8, "gradient_accumulation_steps": 2, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory) -> Path:
    """A short real training of the built-in model on the quickstart task (its held-out prompts are scored below)."""
    from loratune import TrainConfig, train
    from loratune.core.presets import PRESETS

    root = tmp_path_factory.mktemp("quickstart")
    values = {**PRESETS["quickstart"].values, **SHORT_QUICKSTART, "output_dir": str(root / "run")}
    train(TrainConfig(**values))
    return root / "run"


def llama_greedy(llama_cpp, llm, prompt: list[int], budget: int) -> list[int]:
    """Greedy decoding in llama.cpp, stopping where llama.cpp itself says generation ends (the GGUF's end tokens)."""
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    llm.reset()
    llm.eval(prompt)
    out = []
    while len(out) < budget:
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        if llama_cpp.llama_vocab_is_eog(vocab, token):
            break
        out.append(token)
        llm.eval([token])
    return out


@pytest.mark.slow
def test_llama_cpp_answers_the_held_out_prompts_like_transformers(quickstart_run, llama_cpp, tmp_path):
    """16 of the quickstart's held-out prompts (all 48 took a quarter of the suite's time), answered greedily by
    transformers (base + adapter, in fp32, as `loratune eval --generate` generates) and by llama.cpp from each
    exported file."""
    import time
    from importlib import metadata

    from loratune.core.presets import PRESETS
    from loratune.data.prepare import read_examples
    from loratune.inference.run import load_run
    from loratune.modeling.generate import generate_texts
    from loratune.modeling.model import BUILTIN_MODELS

    run = load_run(quickstart_run)
    run.model.float()  # the weights training produced, computed exactly (bf16 rounds differently on each CPU)
    examples = read_examples(PRESETS["quickstart"].values["test_data"], "test", run.config)[:16]
    prompts = [run.encoder.prompt_ids(ex) for ex in examples]
    references = [run.encoder.reference(ex).strip() for ex in examples]
    budget = max(len(run.tokenizer(r, add_special_tokens=False).input_ids) for r in references) + 16
    expected = generate_texts(run.model, run.tokenizer, prompts, run.encoder.end_ids, budget)
    hf_exact = sum(a == r for a, r in zip(expected, references))

    files, seconds = {}, {}
    for kind in ("f16", "bf16", "q8_0", "adapter"):
        start = time.perf_counter()
        files[kind] = export_gguf(quickstart_run, tmp_path / f"q-{kind}.gguf", "f16" if kind == "adapter" else kind,
                                  adapter_only=kind == "adapter").path  # fmt: skip
        seconds[kind] = time.perf_counter() - start
    spec = BUILTIN_MODELS[run.config.model]
    base = Path(metadata.distribution(spec.package).locate_file(spec.file))  # the Q4_1 file training's base came from
    models = {k: {"model": files[k]} for k in ("f16", "bf16", "q8_0")}
    models.update(adapter={"model": base, "lora_path": str(files["adapter"])}, base={"model": base})
    results = {}
    for kind, options in models.items():
        llm = load(llama_cpp, options.pop("model"), **options)
        try:
            vocab = llama_cpp.llama_model_get_vocab(llm.model)
            assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in run.encoder.end_ids)
            for ex, prompt in zip(examples[:4], prompts):  # llama.cpp tokenizes the rendered prompt as training did
                text = run.encoder.render(ex.messages[:-1], add_generation_prompt=True)
                assert llm.tokenize(text.encode(), add_bos=True, special=True) == prompt
            asked = prompts if kind != "base" else prompts[:8]  # the base alone: enough to see it does not score
            answers = [llama_greedy(llama_cpp, llm, p, budget) for p in asked]
            if kind == "f16":  # the path a user takes: the GGUF's own chat template and end tokens
                for ex, answer in zip(examples[:3], answers):
                    reply = llm.create_chat_completion(ex.messages[:-1], temperature=0.0, max_tokens=budget)
                    assert reply["choices"][0]["message"]["content"] == llm.detokenize(answer).decode()
        finally:
            llm.close()
        texts = [run.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
        results[kind] = {
            "identical": sum(a == e for a, e in zip(texts, expected)),
            "exact_match": sum(a == r for a, r in zip(texts, references)),
        }
    sizes = {k: f.stat().st_size for k, f in files.items()}
    print(f"\n{len(prompts)} held-out prompts; transformers exact match {hf_exact}; llama.cpp {results}; "
          f"sizes {sizes}; export seconds { {k: round(v, 1) for k, v in seconds.items()} }")  # fmt: skip

    n = len(prompts)
    assert hf_exact >= 0.25 * n and results["base"]["exact_match"] == 0  # the adapter is what scores
    for kind in ("f16", "bf16"):
        assert results[kind]["identical"] >= 0.9 * n and abs(results[kind]["exact_match"] - hf_exact) <= 1, kind
    assert abs(results["q8_0"]["exact_match"] - hf_exact) <= 2
    assert results["adapter"]["exact_match"] == hf_exact
    assert sizes["q8_0"] < 0.6 * sizes["f16"] and sizes["adapter"] < 0.05 * sizes["f16"]
