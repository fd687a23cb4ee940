"""What a chat template gives generation before each answer, and what the model must produce for it.

For every assistant turn, the prompt is the template's generation-time render of the conversation before it
(add_generation_prompt), and the target is the turn as the template renders it in a conversation that ends on that
answer, from where that render leaves the prompt, through the template's end-of-turn token and nothing after it.

Most templates render a conversation as a growing prefix: the render that ends on the answer starts with the
generation prompt, and the rest is the turn. Some real templates do not:
- the generation prompt holds text that the rendered turn lacks (Gemma 4's empty thought channel);
- the render that ends on the answer moves earlier text (Mistral v0.3 and Nemo put the system text into the last
  user turn, so a conversation ending on an answer renders without it).
For those the turn is found from renders with marks in place of the previous message's text and of the answer's
text (private-use characters, which no template trims or matches): the turn is what follows the previous message
in the render that ends on the answer, less the part that the generation prompt also has.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

from .formats import RowError

ANSWER_MARK = "\ue000"
PREVIOUS_MARK = "\ue001"


@dataclass(frozen=True)
class Answer:
    """One assistant turn: what generation is given before it, and what the model must produce."""

    turn: int  # the message's index in the conversation
    prompt: str
    target: str  # the answer as the template renders it, through its end-of-turn token (when it has one)


class ChatTemplate:
    """A Jinja chat template with a tokenizer: renders, and splits conversations into answers."""

    def __init__(self, tokenizer, template: str):
        self.tok = tokenizer
        self.template = template
        self.tail, self.turn_end = self._probe()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # A template's own checks (raise_exception), or its assumptions about the turns, failing.
        except (TemplateError, ValueError, IndexError, KeyError, TypeError) as e:
            raise RowError(f"the chat template refused the conversation up to here: {e}") from None

    def answers(self, messages: list[dict]) -> list[Answer]:
        """Every answer of the conversation; an opening assistant turn answers nothing, so it is context."""
        out = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant" or i == 0:
                continue
            try:
                prompt = self.render(messages[:i], add_generation_prompt=True)
                full = self.render(messages[: i + 1])
                turn = full[len(prompt) :] if full.startswith(prompt) else self._turn_by_marks(messages, i)
            except RowError as e:
                raise RowError(f"turn {i} (an answer; turns count from 0): {e}") from None
            out.append(Answer(i, prompt, self._through_turn_end(turn)))
        return out

    def _turn_by_marks(self, messages: list[dict], i: int) -> str:
        """The answer's turn when the render that ends on it does not start with the generation prompt."""
        before = [*messages[: i - 1], {**messages[i - 1], "content": PREVIOUS_MARK}]
        prompt = _after_previous(self.render(before, add_generation_prompt=True))
        marked = _after_previous(self.render([*before, {**messages[i], "content": ANSWER_MARK}]))
        turn = _after_previous(self.render([*before, messages[i]]))
        if ANSWER_MARK not in marked:
            raise RowError("the chat template does not render the answer's text, so there is nothing to learn")
        opening = marked[: marked.index(ANSWER_MARK)]
        shared = _common_prefix(prompt, opening)
        if shared == 0 or (shared < len(prompt) and shared < len(opening)) or turn[:shared] != opening[:shared]:
            raise RowError(
                "the chat template does not render this answer after its generation prompt (the prompt goes on "
                f"{prompt[:60]!r} after the previous turn's text, the answer's turn {opening[:60]!r}), so what the "
                "model should produce is unclear"
            )
        return turn[shared:]

    def _through_turn_end(self, turn: str) -> str:
        """The turn cut after its end-of-turn token: what a template adds after it (Phi's end-of-text, a newline)
        belongs to no answer. A literal marker inside the answer's text is not mistaken for the real one."""
        if self.turn_end is None:  # no end-of-turn token: trailing whitespace is context; EOS is added later
            if self.tail and turn.endswith(self.tail):
                return turn[: len(turn) - len(self.tail)] + self.tail.rstrip()
            return turn.rstrip()
        if self.tail and turn.endswith(self.tail):
            return turn[: len(turn) - len(self.tail) + self.tail.index(self.turn_end) + len(self.turn_end)]
        cut = turn.rfind(self.turn_end)
        return turn[: cut + len(self.turn_end)] if cut >= 0 else turn.rstrip()

    def _probe(self) -> tuple[str | None, str | None]:
        """What the template renders after an answer's text, and the end-of-turn token in it: the first special
        token there (`<|end|>`, not the `<|endoftext|>` Phi adds after it; `<|im_end|>`, `<end_of_turn>`, EOS)."""
        try:
            text = self.render([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER_MARK}])
        except RowError:
            return None, None
        if text.count(ANSWER_MARK) != 1:
            return None, None
        tail = text[text.index(ANSWER_MARK) + 1 :]
        special = {i for i, t in self.tok.added_tokens_decoder.items() if t.special} | set(self.tok.all_special_ids)
        for token in self.tok(tail, add_special_tokens=False).input_ids:
            if token in special:
                return tail, self.tok.convert_ids_to_tokens(token)
        return tail, None


def _after_previous(text: str) -> str:
    if text.count(PREVIOUS_MARK) != 1:
        raise RowError(
            "the chat template does not show the previous turn's text exactly once, so where the answer's turn "
            "begins cannot be found"
        )
    return text[text.index(PREVIOUS_MARK) + 1 :]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
