"""lm-evaluation-harness adapter: our model + our tokenizer as an ``lm_eval.api.model.LM`` (registered as
``neox_l2e``), so any checkpoint (ours with a SentencePiece tokenizer, or a HF folder) is evaluated offline
without going through transformers' AutoTokenizer.

    lm = NeoXL2ELM.from_checkpoint("runs/demo/checkpoints")
    lm_eval.simple_evaluate(model=lm, tasks=[...], task_manager=...)
    # or from the harness's own command line, through the wrapper that registers the model first:
    #   python -m neox_l2e.lm_eval --model neox_l2e --model_args checkpoint=runs/demo/checkpoints,batch_size=16 ...

Scoring follows the harness's reference (HF) model: the context and continuation are encoded together and
split where the context's own encoding ends (trailing spaces of the context move to the continuation), the
window is truncated on the left to the model's context length, an empty context is replaced by the EOD token,
and log-probabilities are taken over the tokenizer's vocabulary (padded vocabulary rows are left out).
Generation is greedy and recomputes the full forward per token (the model keeps no KV cache): fine for the
short answers of the tasks here.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import lm_eval.models  # noqa: F401  (the built-in models first: the registry imports them only while it is empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .common import AnalysisError, Tokenizer


def _batch_size(value) -> int:
    """An integer batch size; the harness's 'auto' / 'auto:N' (no search here) is 8."""
    if isinstance(value, str) and value.startswith("auto"):
        return 8
    try:
        return max(1, int(value))
    except (TypeError, ValueError):
        raise AnalysisError(f"batch_size {value!r}: expected an integer") from None


@register_model("neox_l2e")
class NeoXL2ELM(LM):
    def __init__(
        self,
        model=None,
        tokenizer=None,
        checkpoint: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        batch_size: int = 8,
        max_length: Optional[int] = None,
        device: str = "auto",
        dtype: Optional[str] = None,
        max_gen_toks: int = 64,
        tag: Optional[str] = None,
        **_ignored,
    ):
        super().__init__()
        from .common import parse_dtype, pick_device

        if model is None:
            if checkpoint is None:
                raise AnalysisError("NeoXL2ELM needs a model or checkpoint=PATH")
            from .loading import load_model

            dev = pick_device(device)
            dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
            loaded = load_model(checkpoint, device=dev, dtype=dt, tokenizer=tokenizer_path, tag=tag)
            model, tokenizer = loaded.model, loaded.tokenizer
            self.name = loaded.name
        else:
            self.name = getattr(model, "name", "model")
        if tokenizer is None:
            raise AnalysisError("NeoXL2ELM needs a tokenizer")
        self.model = model.eval()
        self.tok = Tokenizer.wrap(tokenizer)
        self.batch_size = _batch_size(batch_size)
        cfg = model.cfg.model
        self.max_length = int(max_length or cfg.max_position_embeddings or cfg.seq_length)
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device
        vs = self.tok.vocab_size
        self.vocab_limit = vs if 0 < vs <= model.vocab_size else model.vocab_size

    @classmethod
    def from_checkpoint(cls, path, **kw) -> "NeoXL2ELM":
        return cls(checkpoint=str(path), **kw)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "NeoXL2ELM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "NeoXL2ELM":
        """From ``--model_args`` (checkpoint=PATH, tokenizer=FILE, tag, dtype, max_length, batch_size, device) and
        the harness's --batch_size / --device, the model_args winning where both are given."""
        args = dict(arg_dict or {})
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k in ("batch_size", "device")}
        if "tokenizer" in args:
            args["tokenizer_path"] = args.pop("tokenizer")
        return cls(**{**extra, **args})

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    # ------------------------------------------------------------------ scoring
    def _logprobs(self, inputs: List[List[int]]) -> torch.Tensor:
        """log-softmax [b, s, V] (fp32) for right-padded inputs."""
        width = max(len(x) for x in inputs)
        batch = torch.full((len(inputs), width), self.tok.eod, dtype=torch.long)
        for i, x in enumerate(inputs):
            batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        with torch.inference_mode():
            out = self.model(batch.to(self._device))
            logits = self.model.full_logits(out.logits) if hasattr(self.model, "full_logits") else out.logits
        return F.log_softmax(logits[..., : self.vocab_limit].float(), dim=-1)

    def _encode_pair(self, context: str, continuation: str) -> Tuple[List[int], List[int]]:
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context)
        if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx) :]
        return ctx, self.tok.encode(continuation)

    def _score(self, pairs: Sequence[Tuple[List[int], List[int]]], desc: str) -> List[Tuple[float, bool]]:
        """(sum log p(continuation | context), greedy?) for token pairs; longest first, batched."""
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: List[Optional[Tuple[float, bool]]] = [None] * len(pairs)
        from tqdm.auto import tqdm

        for s in tqdm(range(0, len(order), self.batch_size), desc=desc, disable=len(order) < 64, leave=False):
            idx = order[s : s + self.batch_size]
            inputs, spans = [], []
            for i in idx:
                ctx, cont = pairs[i]
                if not cont:
                    raise AnalysisError("empty continuation in a loglikelihood request")
                full = (ctx or [self.tok.eod]) + cont
                full = full[-(self.max_length + 1) :]
                inp = full[:-1]
                inputs.append(inp)
                n = min(len(cont), len(inp))  # a continuation longer than the window: its last tokens
                spans.append((len(inp) - n, cont[-n:]))
            lp = self._logprobs(inputs)
            for row, i in enumerate(idx):
                start, cont = spans[row]
                part = lp[row, start : start + len(cont)]  # [n, V]
                target = torch.tensor(cont, device=part.device)
                ll = part.gather(1, target[:, None]).sum().item()
                greedy = bool((part.argmax(-1) == target).all())
                results[i] = (ll, greedy)
        return results  # type: ignore[return-value]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[Tuple[float, bool]]:
        pairs = [self._encode_pair(*r.args) for r in requests]
        out = self._score(pairs, "loglikelihood")
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", r.args, o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for r in requests:
            (text,) = r.args[:1]
            toks = self.tok.encode(text)
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    token_list=toks, prefix_token=self.tok.eod, max_seq_len=self.max_length, context_len=1
                )
            ]
            total = sum(ll for ll, _ in self._score(windows, "rolling")) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for r in requests:
            context, gen_kwargs = r.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
            keep = max(1, self.max_length - max_new)  # room for the answer in the window
            toks = (self.tok.encode(context) or [self.tok.eod])[-keep:]
            gen: List[int] = []
            text = ""
            for _ in range(max_new):
                window = (toks + gen)[-self.max_length :]
                nxt = int(self._logprobs([window])[0, -1].argmax())
                if nxt == self.tok.eod:
                    break
                gen.append(nxt)
                text = self.tok.decode(gen)
                if any(u in text for u in until):
                    break
            for u in until:
                if u in text:
                    text = text.split(u)[0]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out
