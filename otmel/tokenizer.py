"""The locally built tokenizer of the `tiny` preset.

No hub, no download: a byte-level BPE is trained in well under a second on a fixed built-in corpus, so
every process (each Ray worker, each test) builds the identical tokenizer. Byte-level means any text is
encodable (no unknown token); the built-in corpus only decides which words get single tokens.

Pairs are encoded as `<bos> A <eos> B <eos>`, i.e. the spec's `[CLS] mention [SEP] sentence [SEP]`.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"

# Common English words plus the vocabulary of scenes, objects and attributes that entity-linking data
# (and our synthetic benchmark) talks about. Order and content are part of the tokenizer's identity.
_CORPUS = """
the of and to in is was for on that with as by at from his her their its an be are were this which or had
has have not but who it he she they one all also after first new two other into more than most such only
between during over through before under about against since many known may used three city state world year
years part time people team name called later born died american british french german english national
university school house river town war county album film song game series season club league player party
president king queen prince church company music group band station book novel show family member members
work works area region village district province country island lake mountain park road street bridge museum
hospital airport building tower castle palace temple stadium theatre hotel market red blue green yellow
orange purple pink brown black white grey gray gold silver cyan magenta teal navy circle square triangle
star cross diamond heart ring hexagon pentagon oval rectangle arrow moon sun cloud tree flower leaf fish
bird cat dog horse car boat plane train bus bicycle house apple ball cup key hat small large big little left
right top bottom center middle near next above below inside outside shows photo picture image painting
drawing logo flag map portrait scene object objects shape shapes colour color has shows contains features
depicts holds carries wears stands sits near beside behind front back mister doctor saint lord lady sir
general captain professor senator governor mayor minister bishop named known famous played wrote directed
founded married became won served elected released located
""".split()  # noqa: SIM905


@functools.lru_cache(maxsize=4)
def _train_backend(vocab_size: int) -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS, UNK],  # ids 0..3, fixed
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Each word several times and in lower and title case, so that frequent words merge into one token.
    lines = [" ".join(_CORPUS)] * 4 + [" ".join(w.title() for w in _CORPUS)] * 2
    tok.train_from_iterator(lines, trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}",
        pair=f"{BOS} $A {EOS} $B:1 {EOS}:1",
        special_tokens=[(BOS, bos), (EOS, eos)],
    )
    return tok.to_str()


def build_tiny_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE tokenizer (ids: pad 0, bos 1, eos 2, unk 3)."""
    backend = Tokenizer.from_str(_train_backend(vocab_size))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=512,
    )
