"""Chat template families of Gemma and Phi, each as a reference Jinja template (how the family's published template
renders a text conversation; written here, not copied) and the Go template Ollama renders the same way.

A run's template is matched by its renderings (modelfile.py), so these only need to render alike. Published
templates open with the BOS token, which llama.cpp and Ollama add themselves (modelfile.py compares without it).
Gemma's templates trim each message; Go's text/template cannot, so text with leading or trailing whitespace is
rendered as it is in Ollama.
"""

from __future__ import annotations

# True on the last message: where the generation prompt (or, for some, the end of sequence) goes.
_LAST = "(eq (len (slice $.Messages $i)) 1)"

# Gemma 3 (and Gemma 2, which refuses a system message): a system text opens the first user turn.
GEMMA = (
    "{%- set system = messages[0]['content'] + '\n\n' if messages[0]['role'] == 'system' else '' -%}"
    "{%- for m in (messages[1:] if messages[0]['role'] == 'system' else messages) -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' }}"
    "{{ (system if loop.first else '') + m['content'] + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
_GEMMA_GO = (
    '{{- $system := "" }}{{- range $i, $m := .Messages }}'
    '{{- if and (eq $i 0) (eq $m.Role "system") }}{{ $system = printf "%s\\n\\n" $m.Content }}'
    '{{- else }}<start_of_turn>{{ if eq $m.Role "assistant" }}model{{ else }}{{ $m.Role }}{{ end }}\n'
    '{{ $system }}{{ $system = "" }}{{ $m.Content }}<end_of_turn>\n{{ end }}'
    "{{ if and " + _LAST + ' (ne $m.Role "assistant") }}<start_of_turn>model\n{{ end }}'
    "{{- end }}"
)

# Phi-3: <|ROLE|>, a newline, the text and <|end|> per turn; a finished conversation ends with EOS.
PHI3 = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{%- endfor -%}"
    "{{ '<|assistant|>\n' if add_generation_prompt else eos_token }}"
)
_PHI3_TURN = "<|{{ $m.Role }}|>\n{{ $m.Content }}<|end|>\n"
_PHI3_END = "{{ if " + _LAST + ' }}{{ if eq $m.Role "assistant" }}@EOS@{{ else }}<|assistant|>\n{{ end }}{{ end }}'
_PHI3_GO = "{{- range $i, $m := .Messages }}" + _PHI3_TURN + _PHI3_END + "{{- end }}"
# Phi-3.5: as Phi-3, and a system turn with no text is left out.
PHI3_5 = PHI3.replace("{%- for m in messages -%}", "{%- for m in messages if m['role'] != 'system' or m['content'] -%}")
_PHI3_5_GO = (
    '{{- range $i, $m := .Messages }}{{ if or (ne $m.Role "system") $m.Content }}' + _PHI3_TURN + "{{ end }}"
    + _PHI3_END + "{{- end }}"
)  # fmt: skip
# Phi-4: <|im_start|>ROLE<|im_sep|>, the text and <|im_end|>, no newlines.
PHI4 = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '<|im_sep|>' + m['content'] + '<|im_end|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant<|im_sep|>' }}{%- endif -%}"
)
_PHI4_GO = (
    "{{- range $i, $m := .Messages }}<|im_start|>{{ $m.Role }}<|im_sep|>{{ $m.Content }}<|im_end|>"
    "{{ if and " + _LAST + ' (ne $m.Role "assistant") }}<|im_start|>assistant<|im_sep|>{{ end }}'
    "{{- end }}"
)
# Phi-4-mini: <|ROLE|>, the text and <|end|>, no newlines; a finished conversation ends with EOS.
PHI4_MINI = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>' + m['content'] + '<|end|>' }}{%- endfor -%}"
    "{{ '<|assistant|>' if add_generation_prompt else eos_token }}"
)
_PHI4_MINI_GO = (
    "{{- range $i, $m := .Messages }}<|{{ $m.Role }}|>{{ $m.Content }}<|end|>"
    + _PHI3_END.replace("<|assistant|>\n", "<|assistant|>") + "{{- end }}"
)  # fmt: skip

# (reference Jinja template, Go template with @EOS@ for the end-of-sequence text)
FAMILY_TEMPLATES = [
    (GEMMA, _GEMMA_GO),
    (PHI3, _PHI3_GO),
    (PHI3_5, _PHI3_5_GO),
    (PHI4, _PHI4_GO),
    (PHI4_MINI, _PHI4_MINI_GO),
]
