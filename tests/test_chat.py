import subprocess
import sys

from loratune.data.formats import Example
from loratune.inference.run import load_run
from loratune.modeling.generate import generate_texts


def test_chat_from_a_script_streams_replies_keeps_history_and_resets(tiny_run):
    script = "/reset\nsend two lamps\nand a blue mug\n/reset\nand a blue mug\n/exit\nnever read\n"
    result = subprocess.run(
        [sys.executable, "-m", "loratune", "chat", str(tiny_run), "--max-new-tokens", "12"],
        input=script,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("(new conversation)") == 2

    # Each reply is what greedy generation gives for the conversation so far, in the training format.
    run = load_run(tiny_run)

    def reply(*messages):
        turns = [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 3, messages)]
        ex = Example(messages=[*turns, {"role": "assistant", "content": ""}])
        return generate_texts(run.model, run.tokenizer, [run.encoder.prompt_ids(ex)], run.encoder.end_ids, 12)[0]

    first = reply("send two lamps")
    second = reply("send two lamps", first, "and a blue mug")
    fresh = reply("and a blue mug")
    assert second != fresh  # the history changes the answer, so the check below tells them apart
    assert result.stdout.split() == f"{first}\n{second}\n{fresh}\n".split()
