"""A Hugging Face `transformers` model as the backbone of the one segment loop (`backbone=hf`, the `hf` extra).

`HFBackbone` offers what `recurrence.RecurrentModel` asks of `backbone.Backbone`: `embed_tokens`, `forward(h,
caches, mask_bias)` over a segment's `[read ; tokens ; write]` rows, `head` (a `SoftmaxHead` over the model's LM
head, or over a new linear layer for an encoder), `d_model` and `memory_scale`; so memory, BPTT-k, the
curriculum, greedy decoding, the memory-reset control and resume are the loop's, for both backbones. What differs:

- decoder (causal LMs: GPT-2, Llama, GPT-NeoX families; `hf_kind: decoder`): the segment loop's mask (Sec. 3:
  tokens never see the write block, write rows see everything) goes in as a 4D additive `attention_mask`, which
  `transformers` uses as given (`masking_utils`: a 4D mask is returned as-is) in its eager and SDPA attention.
  Positions are the model's own (absolute or rotary) over `[read ; tokens ; write]`, 0 .. m+n+m-1.
- encoder (BERT, RoBERTa, DeBERTa families; `hf_kind: encoder`): the follow-up's layout (arXiv 2304.11062),
  `[CLS] read [SEP] tokens [SEP]`, bidirectional; the read rows' outputs are the next segment's memory (no write
  block); the [CLS] output stands in the segment's last token row, where the tasks read their one answer
  (classification on the last segment). The layout takes 3 of the model's positions (499 + 10 + 3 = 512).

No Transformer-XL cache, no key/value decoding buffer (`incremental = False`: greedy decoding re-runs the segment
per generated token), no attention capture. The input embedding and output layer are resized to the task's
vocabulary (`resize_token_embeddings`): the tasks here have their own symbols, so the pretrained rows beyond them
go; the transformer layers keep their weights.

Shapes: B batch, Q rows of a segment (m + n + m), K keys (= Q: no cache), d the model's hidden size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from rmt_bench.config import ConfigError, ModelConfig
from rmt_bench.models.heads import SoftmaxHead

HUB = "https://huggingface.co"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("backbone", "backbone=hf needs the hf extra: pip install -e '.[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_pretrained(name: str, kind: str, key: str = "model.hf_name"):
    """`from_pretrained` of a local directory or a Hub name: a `decoder` (a causal LM), an `encoder` (the base model)
    or a `tokenizer`. Fails at once with one line naming `key` when it is not there (no network: the Hub is probed
    first, and offline mode reads only the local cache)."""
    tf = _transformers()
    local = Path(name).expanduser()
    if not local.is_dir() and name.startswith(("/", ".", "~")):  # a path, not a Hub id (`org/name`)
        raise ConfigError(key, f"{name} is not a directory (a model saved with save_pretrained)")
    if not local.is_dir():
        from rmt_bench.net import reachable

        if os.environ.get("HF_HUB_OFFLINE") != "1" and not reachable(os.environ.get("HF_ENDPOINT", HUB)):
            os.environ["HF_HUB_OFFLINE"] = "1"  # the cache only, no retries
    source = str(local) if local.is_dir() else name
    try:
        if kind == "tokenizer":
            return tf.AutoTokenizer.from_pretrained(source)
        auto = tf.AutoModelForCausalLM if kind == "decoder" else tf.AutoModel
        return auto.from_pretrained(source, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        if local.is_dir():
            what = str(exc).splitlines()[0]
            raise ConfigError(key, f"{name}: cannot load a {kind} from this directory ({what})") from None
        raise ConfigError(
            key,
            f"{name}: not a local directory and not in the Hugging Face cache (offline or not on the Hub); download "
            f"it where there is network (huggingface-cli download {name}) or give a directory saved with "
            "save_pretrained",
        ) from None


class HFBackbone(nn.Module):
    """A wrapped `transformers` model behind the own backbone's interface (module docstring)."""

    incremental = False  # no KVBuffer decoding

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        self.cfg, self.kind = cfg, cfg.hf_kind
        model = load_pretrained(cfg.hf_name, cfg.hf_kind)
        self.bidirectional = self.kind == "encoder"
        self.extra_rows = 3 if self.bidirectional else 0  # positions beyond the loop's rows: [CLS] and two [SEP]
        embed = model.get_input_embeddings()
        if self.bidirectional:  # [CLS] and [SEP] as learned vectors, from the tokenizer's rows when it has them
            self.special = nn.Parameter(self._special_rows(embed.weight.detach()))
        if embed.num_embeddings != vocab_size:
            model.resize_token_embeddings(vocab_size, mean_resizing=False)
        self.model = model  # decoder: the *ForCausalLM; encoder: the base model
        self.body = model.base_model if self.kind == "decoder" else model
        self.d_model = model.config.hidden_size
        if self.kind == "decoder":
            self.head = SoftmaxHead.around(model.get_output_embeddings())
        else:
            self.head = SoftmaxHead.around(nn.Linear(self.d_model, vocab_size))
            nn.init.normal_(self.head.proj.weight, 0.0, model.config.initializer_range)
            nn.init.zeros_(self.head.proj.bias)
        positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 0)
        self.max_positions = positions or None

    def _special_rows(self, weight: Tensor) -> Tensor:
        """(2, d): the [CLS] and [SEP] rows of the model's embedding (RoBERTa: <s>, </s>), found by its tokenizer
        in the same directory / Hub entry; drawn at the embedding's scale when there is none."""
        tf = _transformers()
        try:
            tok = tf.AutoTokenizer.from_pretrained(self.cfg.hf_name)
            ids = [tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id,
                   tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id]  # fmt: skip
            if None not in ids and max(ids) < weight.shape[0]:
                return weight[ids].clone()
        except (OSError, ValueError, TypeError):
            pass
        return torch.randn(2, weight.shape[1]) * weight.std()

    @property
    def memory_scale(self) -> float:
        """The standard deviation of the token embeddings: the learned memory's initial scale."""
        return float(self.model.get_input_embeddings().weight.detach().float().std())

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """tokens (B, n) -> the model's word embeddings (B, n, d); positions are added inside the model."""
        return self.model.get_input_embeddings()(tokens)

    def forward(self, h: Tensor, caches=None, mask_bias: Tensor | None = None, past=None, capture=None):
        """h (B, Q, d): [read ; tokens ; write] (encoder: [read ; tokens]); mask_bias (Q, Q) additive, the segment
        loop's. -> hidden (B, Q, d), and no layer inputs (no cache)."""
        if caches or past is not None or capture is not None:
            raise ConfigError("backbone", "a wrapped Hugging Face model has no cache, decoding buffer or capture")
        if self.bidirectional:
            return self._encode(h, mask_bias), []
        return self.body(inputs_embeds=h, attention_mask=self._additive(mask_bias, h)).last_hidden_state, []

    def _additive(self, mask_bias: Tensor, h: Tensor) -> Tensor:
        """(Q, K) with -inf -> (B, 1, Q, K) in h's dtype with its most negative finite value (every row keeps at
        least one key, so no softmax row is empty)."""
        bias = mask_bias.to(h.dtype).clamp(min=torch.finfo(h.dtype).min)
        return bias[None, None].expand(h.shape[0], 1, *bias.shape)

    def _encode(self, h: Tensor, mask_bias: Tensor) -> Tensor:
        """[CLS] read [SEP] tokens [SEP] through the encoder; -> [read ; tokens] outputs, the last token row being
        the [CLS] output (where the answer is read)."""
        bsz, q = h.shape[0], h.shape[1]
        m = self.cfg.num_mem_tokens
        cls, sep = (self.special[i].to(h.dtype).expand(bsz, 1, -1) for i in range(2))
        x = torch.cat([cls, h[:, :m], sep, h[:, m:], sep], 1)  # (B, Q + 3, d)
        # the loop's mask over [read ; tokens] (padding hidden), with [CLS] and the two [SEP] seen by all and seeing
        # all: rows/columns 0, m + 1 and the last
        order = [q, *range(m), q + 1, *range(m, q), q + 2]  # positions of x in the enlarged mask
        full = torch.zeros(q + 3, q + 3, dtype=mask_bias.dtype, device=mask_bias.device)
        full[:q, :q] = mask_bias
        full[q:, :q] = mask_bias[q - 1]  # the special rows see what the last token sees (padding hidden)
        full = full[order][:, order]
        out = self.body(inputs_embeds=x, attention_mask=self._additive(full, x)).last_hidden_state
        hidden = torch.cat([out[:, 1 : m + 1], out[:, m + 2 : -1]], 1)  # (B, Q, d)
        return torch.cat([hidden[:, :-1], out[:, :1]], 1)  # the [CLS] output in the last token row


__all__ = ["HFBackbone", "load_pretrained"]


def make_tiny(family: str, out: Path, texts: list[str], vocab_size: int = 2000, width: int = 64) -> Path:
    """A small random model of `family` (`bert`: an encoder; `gpt2`: a decoder) with a word-level tokenizer built
    from `texts`, saved with save_pretrained into `out`: the offline stand-in for a Hub model (the CPU scale of
    Table 3, the tests). 2 layers of `width`, 4 heads, 512 positions, init std sqrt(2 / (5 width)) (at the usual
    0.02 a small random model's memory reads a near-uniform average: docs/ARCHITECTURE.md, Backbone style)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from rmt_bench.config import width_std

    tf = _transformers()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special))
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                      cls_token="[CLS]", sep_token="[SEP]")  # fmt: skip
    sizes = dict(hidden_size=width, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * width,
                 initializer_range=width_std(width), max_position_embeddings=512)  # fmt: skip
    if family == "bert":
        model = tf.BertModel(tf.BertConfig(vocab_size=len(fast), pad_token_id=0, **sizes))
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=len(fast), n_positions=512, n_embd=width, n_layer=2, n_head=4,
                            initializer_range=width_std(width), bos_token_id=2, eos_token_id=3)  # fmt: skip
        model = tf.GPT2LMHeadModel(cfg)
    else:
        raise ConfigError("family", f"'{family}': choose bert or gpt2")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out
