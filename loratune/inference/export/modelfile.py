"""An Ollama Modelfile for an exported GGUF: where the weights are, the prompt format in Ollama's Go-template
syntax, and a stop for every end token.

A chat template is translated when it renders like one of the template families below: its renderings of probe
conversations (with and without a system message, one and several turns, with and without the generation prompt)
must equal the family's reference template's. Anything else is left to the template stored in the GGUF.
"""

from __future__ import annotations

import json

from jinja2 import TemplateError

from ...data.encode import BUILTIN_TEMPLATES
from .chat_families import FAMILY_TEMPLATES

# ChatML whose template adds a fixed system message when the conversation has none (SmolLM2's, Qwen2's).
_DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n' + default_system + '<|im_end|>\n' }}"
    "{%- endif -%}"
)
_CHATML_GO = (
    "{{- range $i, $m := .Messages }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
    '{{ if and (eq (len (slice $.Messages $i)) 1) (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}'
    "{{- end }}"
)
_DEFAULT_SYSTEM_GO = (
    '{{- if and .Messages (ne (index .Messages 0).Role "system") }}<|im_start|>system\n@SYSTEM@<|im_end|>\n{{ end }}'
)
_PLAIN_GO = (
    '{{- range .Messages }}{{ if eq .Role "assistant" }}{{ .Content }}@EOS@{{ else }}{{ .Content }}\n{{ end }}{{ end }}'
)
_ALPACA_GO = (
    '{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}\n\n'
    '{{ else if eq .Role "user" }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
    "{{ else }}{{ .Content }}@EOS@\n\n{{ end }}{{ end }}"
)
# Raw prompts (a run trained on prompt/completion or plain text): the text as given.
RAW_GO = "{{ .Prompt }}"
# What a chat template raises when it refuses a conversation (its own checks, or its assumptions about the turns).
TEMPLATE_ERRORS = (TemplateError, ValueError, TypeError, KeyError, IndexError)

_SYSTEM, _USER, _ASSISTANT = "You answer briefly.", "Hi there,\nhow are you? {x} 'q' \"q\"", "Fine: 3 < 4 & {ok}."
PROBES = [
    [{"role": "user", "content": _USER}],
    [{"role": "user", "content": _USER}, {"role": "assistant", "content": _ASSISTANT}],
    [
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _ASSISTANT},
        {"role": "user", "content": "?"},
    ],
    [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _USER}],
    [{"role": "system", "content": ""}, {"role": "user", "content": _USER}],
    [
        {"role": "system", "content": _SYSTEM},
        {"role": "user", "content": _USER},
        {"role": "assistant", "content": _ASSISTANT},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "Then nothing."},
    ],
]


def render(tokenizer, template: str, messages: list[dict], **variables) -> str:
    """`template` applied as training applied it, with the generation prompt where the last turn is not the
    assistant's (as Ollama renders a conversation)."""
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=messages[-1]["role"] != "assistant",
        **variables,
    )


def go_template(tokenizer, template: str) -> str | None:
    """The Go template that renders like `template` (a Jinja chat template), or None when none is known to."""
    try:
        first = render(tokenizer, template, PROBES[0])
    except TEMPLATE_ERRORS:
        return None
    eos = tokenizer.eos_token or ""
    candidates = [(BUILTIN_TEMPLATES["plain"], _PLAIN_GO, {}), (BUILTIN_TEMPLATES["alpaca"], _ALPACA_GO, {})]
    candidates += [(reference, go, {}) for reference, go in FAMILY_TEMPLATES]
    head = "<|im_start|>system\n"
    if first.startswith(head) and "<|im_end|>" in first:
        system = first[len(head) : first.index("<|im_end|>")]
        go = _DEFAULT_SYSTEM_GO.replace("@SYSTEM@", system) + _CHATML_GO
        candidates.append((_DEFAULT_SYSTEM + BUILTIN_TEMPLATES["chatml"], go, {"default_system": system}))
        pasted = system
    else:
        candidates.append((BUILTIN_TEMPLATES["chatml"], _CHATML_GO, {}))
        pasted = ""
    if any(mark in text for text in (eos, pasted) for mark in ("{{", "}}", '"""')):
        return None  # text pasted into the Go template must not read as template syntax or end the Modelfile string
    own = [_render_or_none(tokenizer, template, p) for p in PROBES]
    if any(text is None for text, p in zip(own, PROBES) if p[0]["role"] != "system"):
        return None  # a template that refuses a plain conversation is no template Ollama could be given
    for reference, go, variables in candidates:
        # Only conversations the run's template renders: the others (Gemma 2's system turns) were never trained on.
        if all(text is None or text == render(tokenizer, reference, p, **variables) for text, p in zip(own, PROBES)):
            return go.replace("@EOS@", eos)
    return None


def _render_or_none(tokenizer, template: str, messages: list[dict]) -> str | None:
    """The rendering without a leading BOS token where the tokenizer adds that itself (llama.cpp and Ollama do
    then too); None where the template refuses the conversation."""
    try:
        text = render(tokenizer, template, messages)
    except TEMPLATE_ERRORS:
        return None
    bos = tokenizer.bos_token
    adds_bos = bos is not None and tokenizer("a").input_ids[:1] == [tokenizer.bos_token_id]
    return text.removeprefix(bos) if adds_bos else text


def modelfile(weights: str, template: str | None, stops: tuple[str, ...], adapter: str | None = None) -> str:
    """The Modelfile text: FROM the weights (the base, for an adapter), ADAPTER, TEMPLATE, a stop per end token.
    `template` is a Go template, or None where the chat template could not be translated."""
    lines = [
        "# Ollama Modelfile written by `loratune export`. Create the model with:",
        "#   ollama create NAME -f THIS_FILE",
        f"FROM {weights}",
    ]
    if adapter:
        lines.append(f"ADAPTER {adapter}")
    if template is None:
        lines += [
            "# The run's chat template has no known translation to Ollama's Go templates, so no TEMPLATE is given",
            "# here: Ollama picks one from the template stored in the GGUF. Check it with: ollama show NAME --template",
        ]
    else:
        lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"
