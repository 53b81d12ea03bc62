"""An offline byte-level BPE tokenizer for tiny test and demo models (no hub access needed)."""

from __future__ import annotations

from functools import lru_cache

_CORPUS = (
    "pick up the red block and place it in the drawer. open the drawer. close the drawer. push the blue "
    "block to the left. turn on the light bulb. turn off the led. rotate the pink block right. lift the "
    "slider. put the bowl on the plate. put both the alphabet soup and the tomato sauce in the basket. "
    "stack the blocks. move the slider to the right. put the mug in the microwave and close it. "
    "transfer the cube. insert the peg into the socket. no lang. robot arm gripper camera view."
)


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512, model_max_length: int = 512):
    """A deterministic ``PreTrainedTokenizerFast`` trained in memory on robot instructions.

    Token ids are < ``vocab_size``. ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        model_max_length=model_max_length,
    )
