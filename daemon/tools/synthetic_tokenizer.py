"""A small byte-level BPE tokenizer for synthetic checkpoints.

The tokenizer is trained locally (no downloads) with the ``tokenizers`` library
on the short English corpus below and written in the Hugging Face layout that
``mlx_lm.load`` / ``transformers.AutoTokenizer`` expect: ``tokenizer.json``,
``tokenizer_config.json`` (chat template), ``special_tokens_map.json``
and ``generation_config.json``.

The chat template is Qwen3's format (ChatML, tools in a ``<tools>`` block, calls as
``<tool_call>`` JSON, results as ``<tool_response>``, ``<think>`` reasoning with ``enable_thinking``),
and the marker tokens are added tokens (not special), as in Qwen's own tokenizers, so mlx-lm's
TokenizerWrapper finds the same things it finds for the real family: ``has_thinking`` (``<think>``
in the vocabulary), ``has_tool_calling`` and ``tool_parser`` (``json_tools``, inferred from the
template), and llguidance sees the markers as text.
"""

import json
from pathlib import Path
from typing import Union

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Added (not special) tokens, as in Qwen3's tokenizer: reasoning and tool-call markers.
MARKER_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen3's chat template (ChatML with its tool and reasoning parts), condensed. Without tools or
# reasoning it renders exactly '<|im_start|>ROLE\nCONTENT<|im_end|>\n' per message.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role in ['user', 'system'] %}"
    "{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content %}"
    "{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{{- message.content or '' }}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{%- if not loop.first or message.content %}{{- '\\n' }}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + (message.content or '') + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)

CORPUS = """\
The river runs past the old mill at the edge of the town. In the morning the
water is cold and clear, and the light comes through the trees in long yellow
lines. Children walk to school along the bank, and the baker opens his shop
before the sun is up. He says that bread is the first thing a town needs and
the last thing it forgets.

A computer is a machine that follows instructions. The instructions are called
a program, and the person who writes them is called a programmer. Programs can
add numbers, sort lists, draw pictures, play music, and answer questions. Most
programs are built from small parts, and each part does one simple job well.
When the parts work together, the whole program can do something that none of
the parts could do alone.

What is the weather like today? It is warm and sunny, with a light wind from
the west. Tomorrow there may be rain in the afternoon, so take a coat if you go
out. In the winter the days are short and the nights are long; in the summer
the evenings stay bright until late, and people sit outside to talk and eat.

The library has thousands of books on every subject: history, science, art,
travel, cooking, and poetry. You can borrow three books at a time for two
weeks. If you need more time, ask at the front desk and they will help you.
Please be quiet in the reading room, because other people are studying there.

Once upon a time there was a small fox who lived at the foot of a great hill.
Every night the fox looked up at the moon and wondered what was on the other
side of the hill. One autumn evening she decided to find out. She climbed for
hours over rocks and roots, and when she reached the top she saw a valley full
of lights, and a village, and a road that went on and on into the dark.

Memory is a resource that every program must share. A good system keeps the
data it needs close at hand and moves the rest to slower storage. A cache holds
recent items so that they can be found again quickly; when the cache is full,
the oldest or least used item is removed to make room for a new one. Reading
from a disk is slower than reading from memory, so careful programs read large
blocks at once and try to guess what they will need next.

Here is a simple recipe for soup. Cut two onions, three carrots and a few
potatoes into small pieces. Cook the onions in a little oil until they are
soft, then add the other vegetables and enough water to cover them. Add salt
and pepper, and let the soup cook slowly for forty minutes. Serve it hot with
fresh bread.

The train leaves the station at nine o'clock and arrives in the city at noon.
Along the way it passes farms, forests, lakes and small villages. Some people
read or sleep during the journey, while others look out of the window and watch
the fields go by. The conductor checks the tickets and answers questions about
the stops.

Numbers are everywhere. One, two, three, four, five, six, seven, eight, nine,
ten. A year has twelve months, a week has seven days, and a day has twenty four
hours. If you have ten apples and give away four, you have six left. If you
share twelve cookies among three friends, each friend gets four.

Thank you for your message. I am happy to help. Could you tell me a little more
about the problem? When did it start, and what have you tried so far? Please
send the error message if there is one. I will look at it and reply as soon as
I can. Have a good day!

Science begins with questions. Why is the sky blue? How do birds find their way
south in the winter? What makes a seed grow into a tree? Scientists watch the
world carefully, make guesses, and test them with experiments. When the results
do not match the guess, they change their ideas and try again.

The market is busy on Saturday. There are stalls with fruit, vegetables, cheese,
fish, flowers and old books. People walk slowly between the tables, talking,
tasting, and choosing what to buy. A musician plays the guitar near the
fountain, and a dog sleeps in the shade under a cart.

Language models read text as a sequence of tokens. A token may be a whole word,
a part of a word, or a single character. The model looks at the tokens it has
seen so far and predicts the next one. A mixture of experts model has many
small feed forward networks, called experts, and a router that chooses a few
of them for each token, so that only a small part of the model runs at a time.
"""


def add_marker_tokens(tokenizer: Tokenizer) -> None:
    """Append the reasoning and tool-call markers as added, non-special tokens (after the learned ones)."""
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKER_TOKENS])


def train_tokenizer(vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer on the embedded corpus, with the marker tokens added last.

    Training is deterministic: the same ``vocab_size`` gives the same
    tokenizer. The corpus is small, so the learned vocabulary may stop short of
    ``vocab_size``; it never exceeds it (markers included).

    Args:
        vocab_size (int): Upper bound on the vocabulary size, special tokens
            included.

    Returns:
        Tokenizer: The trained tokenizer.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKER_TOKENS),
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    tokenizer.train_from_iterator(lines, trainer=trainer)
    add_marker_tokens(tokenizer)
    assert tokenizer.get_vocab_size() <= vocab_size
    return tokenizer


def _write_json(path: Path, data: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)


def save_tokenizer(out_dir: Union[str, Path], vocab_size: int) -> dict:
    """Train the tokenizer and write its files to ``out_dir``.

    Args:
        out_dir (Union[str, Path]): The checkpoint directory.
        vocab_size (int): Upper bound on the vocabulary size (the model's
            ``vocab_size``).

    Returns:
        dict: The special token ids: ``eos_token_id``, ``pad_token_id`` and
        ``im_start_id``, plus the learned ``vocab_size``.
    """
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(vocab_size)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}

    added_tokens_decoder = {
        str(ids[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    for t in MARKER_TOKENS:
        added_tokens_decoder[str(tokenizer.token_to_id(t))] = {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": False,
        }
    _write_json(
        out_dir / "tokenizer_config.json",
        {
            "add_prefix_space": False,
            "added_tokens_decoder": added_tokens_decoder,
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "bos_token": None,
            "chat_template": CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": EOS_TOKEN,
            "errors": "replace",
            "model_max_length": 32768,
            "pad_token": PAD_TOKEN,
            "split_special_tokens": False,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "unk_token": None,
        },
    )
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
            "eos_token": EOS_TOKEN,
            "pad_token": PAD_TOKEN,
        },
    )
    _write_json(
        out_dir / "generation_config.json",
        {
            "eos_token_id": [ids[EOS_TOKEN], ids[PAD_TOKEN]],
            "pad_token_id": ids[PAD_TOKEN],
            "do_sample": False,
        },
    )
    return {
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[PAD_TOKEN],
        "im_start_id": ids["<|im_start|>"],
        "vocab_size": tokenizer.get_vocab_size(),
    }
