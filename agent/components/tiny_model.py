"""A tiny random-weight Llama with a locally trained BPE tokenizer, for real vLLM engines in tests.

Weights cannot be downloaded on development machines and CI, yet the vLLM engine path
(process start, health, batching, metrics, timings) should run for real. This builds a
model of the Llama architecture small enough to serve on two CPU cores: hidden size 128,
2 layers, 2 heads of dimension 64 (vLLM's CPU attention rejects head_dim 16). Its text is
nonsense; everything around it is real.

The build is deterministic for a seed, needs no network, and is atomic: it is written to a
temporary sibling directory, a marker file is written last, and the directory is renamed
into place, so a crash never leaves a half model behind and a finished build is reused.

    python -m agent.components.tiny_model OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports happen only when a build is needed
    from transformers import PreTrainedTokenizerFast

MARKER = "murakkab-tiny-model.json"
BUILD_VERSION = 1
HIDDEN_SIZE = 128
LAYERS = 2
HEADS = 2
HEAD_DIM = 64
INTERMEDIATE_SIZE = 256
MAX_POSITIONS = 4096
TARGET_VOCAB = 1536
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# The chat template renders OpenAI-style messages; list content (text parts) is joined so
# multimodal-shaped requests still render as text.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Built-in training text: enough English, code and punctuation that common words and
# Python syntax get merges of their own, so prompts stay short in tokens.
_CORPUS = """
A compound AI application chains several models and tools. A video question answering request
runs scene detection, frame extraction, speech to text, object detection and a language model.
Developers declare what a workflow does; an optimizer chooses how: the model variant, the knobs
such as frame count or debate rounds, the hardware, and the number of instances of each stage.
The controller plans and places components on nodes, and the agent on every host runs them.
Power and temperature are first class knobs: a power cap lowers energy per request while the
latency objective still holds. When a node gets hot, overloaded or dies, its work moves elsewhere.
Question: what is the capital of France? Answer: the capital of France is Paris.
Question: how many legs does a spider have? Answer: a spider has eight legs.
Context: the cat sat on the mat. The dog slept in the sun. The bird sang in the tree.
Background: the meeting starts at nine in the morning and ends at noon.
Use the context passages to answer the question. If the answer is not in the context, say so.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Retrieval augmented generation embeds a question, finds the nearest passages, and answers
with those passages in the prompt. Embeddings of similar sentences lie close together.
```python
def add(a, b):
    return a + b


def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()


for i in range(10):
    print(i, add(i, i), fibonacci(i))
assert add(2, 3) == 5
```
Here is my solution. Solutions from other agents are below; use them as additional advice and
give an updated answer. Write a Python function that solves the problem and passes the tests.
The objects in the images are: person, car, tree, dog, chair, table, cup, bottle, phone, book.
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -1 + - * / = == != < > <= >= ( ) [ ] { } : ; , . ! ?
"""

# Common words, each repeated so BPE learns whole-word tokens: a vocabulary of about 1.5k.
_WORDS = """
about above across after again against all almost alone along already also although always among amount
and animal another answer any appear apple area argument around arrive art ask at attention available away
back ball bank base battery be beautiful because become bed before begin behind believe below best better
between big bird black blue boat body book both bottom box boy bread break bridge bring brother brown build
business but buy by call camera can car card care carry case cat cause center chair change check child city
class clean clear close cloud cluster code cold color come common company compute computer condition cost
could country course cover create cup current cut data day deep design detect device different dinner
direction discover distance do doctor dog door down draw dream drink drive during each early earth east easy
eat edge effect eight either electric else end energy engine enough enter error even evening event every
example expect experience explain eye face fact fall family far farm fast father feel few field figure file
find fine finish fire first fish five floor flower follow food foot for force forest form four free friend
from front fruit full function game garden gas general get girl give glass go good government gpu great green
ground group grow hair half hand happen happy hard have he head hear heart heat heavy help her here high hill
him his history hold home horse hot hour house how however human hundred idea if image important in inside
instance into island it job join just keep key kind king kitchen know lake land language large last late
later latency laugh lead learn leave left less letter level life light like line list listen little live
load long look lose lot love low machine main make man many map mark market matter may meet memory middle
might mind minute miss model moment money month more morning most mother mountain move much music must name
near need network never new next night nine no node north not note nothing now number object of off office
often old on once one only open or order other our out outside over own page paper parent part party pass
people perhaps person picture piece place plan plant play please point power present price problem process
program pull push put queue quick quiet rain reach read ready real reason red remember request rest result
return right river road rock room round rule run safe same say scene school sea second see send sentence
server set seven shape she ship short should show side simple since sing sister sit six size sky sleep slow
small snow so some something song soon sound south space speak special speed spring stand star start state
stay step still stone stop store story street strong student study such summer sun system table take talk
teacher team tell temperature ten test than that the their them then there these they thing think third this
those though thought thousand three through time to today together token too top total town train travel
tree true try turn two under understand until up upon us use usual valley value very video voice wait walk
wall want warm watch water way we weather week well west what wheel when where which while white who why
wide will wind window winter with without woman wonder wood word work world would write year yellow yes yet
you young your
"""


def _offline_guards() -> None:
    """Make any accidental hub access fail fast instead of hanging on a network without egress."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def is_complete(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file()


def _read_marker(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{out_dir / MARKER} is unreadable ({exc}); remove {out_dir} to rebuild") from exc


def _train_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TARGET_VOCAB, min_frequency=1, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = _CORPUS.splitlines(keepends=True) + [" ".join(_WORDS.split()) + "\n"] * 3
    tokenizer.train_from_iterator(lines, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
        model_max_length=MAX_POSITIONS, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _build_into(tmp: Path, seed: int) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer()
    vocab_size = len(tokenizer)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN_SIZE, intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|end|>"),
        pad_token_id=tokenizer.pad_token_id)
    # The chat turn ends with <|end|>; </s> ends a document. Both stop generation.
    end_ids = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.config.dtype = "float32"
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=end_ids, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    marker = {"builder": "agent.components.tiny_model", "version": BUILD_VERSION, "seed": seed,
              "architecture": "LlamaForCausalLM", "hidden_size": HIDDEN_SIZE, "layers": LAYERS, "heads": HEADS,
              "head_dim": HEAD_DIM, "vocab_size": vocab_size}
    # Written last: its presence means every other file is complete.
    (tmp / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def build_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """Build (or reuse) the tiny Llama at ``out_dir`` and return that path.

    Raises RuntimeError if ``out_dir`` holds something else, or a build with another seed.
    """
    _offline_guards()
    out_dir = Path(out_dir).absolute()
    if is_complete(out_dir):
        return _check_reuse(out_dir, seed)
    if out_dir.exists():
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        else:
            raise RuntimeError(f"{out_dir} exists but is not a complete tiny model build "
                               f"(no {MARKER}); remove it or choose another directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        _build_into(tmp, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; engines may run as another user
        try:
            tmp.rename(out_dir)
        except OSError:
            # Another builder finished first; its complete build is as good as ours.
            if not is_complete(out_dir):
                raise
            return _check_reuse(out_dir, seed)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _check_reuse(out_dir: Path, seed: int) -> Path:
    marker = _read_marker(out_dir)
    if marker.get("seed") != seed or marker.get("version") != BUILD_VERSION:
        raise RuntimeError(f"{out_dir} holds a tiny model built with seed {marker.get('seed')} "
                           f"(version {marker.get('version')}), not seed {seed} (version {BUILD_VERSION}); "
                           f"remove it or choose another directory")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.components.tiny_model",
                                     description="Build a tiny random-weight Llama for vLLM tests (offline).")
    parser.add_argument("out_dir", type=Path, help="directory to create (reused when already complete)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization seed (default 0)")
    args = parser.parse_args(argv)
    try:
        path = build_tiny_llama(args.out_dir, seed=args.seed)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
