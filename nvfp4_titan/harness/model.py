"""``nvfp4-titan``: this project's models as an lm-evaluation-harness ``LM``.

Scoring follows lm-eval 0.4.13's ``HFLM`` (``lm_eval/models/huggingface.py``) for a causal
model, so that a converted checkpoint scores the same tokens here and through ``--model hf``:

- ``loglikelihood``: context + continuation encoded whole, the continuation's tokens the tail
  (``TemplateLM._encode_pair``); left-truncated to ``max_length + 1`` tokens; batches sorted
  longest first and right-padded (a causal model's scored positions never see the padding).
- ``loglikelihood_rolling`` (perplexity tasks): each document alone, after the prefix token,
  cut into disjoint windows of ``max_length`` (``lm_eval.utils.get_rolling_token_windows`` with
  ``context_len=1``, ``make_disjoint_window``); every token scored once.
- ``generate_until``: greedy; stops at EOS, at a stop string (``until``, EOS's text added) or
  after ``max_gen_toks``; the context left-truncated to ``max_length - max_gen_toks``; the text
  cut at the first stop string (``postprocess_generated_text``). With ``--apply_chat_template``
  the prompt is rendered by ``nvfp4_titan.data.chat`` as transformers renders it.

Log-probabilities are a float32 log-softmax of the logits (HFLM's default is the logits' dtype).
With dynamic activation scales (the QAT default) each linear's input tensor scale is the amax
over the whole batch, padding included, as in training: results may move in the last bits with
``batch_size``; ``batch_size=1`` gives every request its own.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from nvfp4_titan.convert import ConvertError
from nvfp4_titan.data.chat import ChatTemplate, RowError, load_chat_template
from nvfp4_titan.evaluate import load_model
from nvfp4_titan.harness.encoding import model_encoder
from nvfp4_titan.harness.errors import CHAT_TEMPLATE, HarnessError, recipe_path

log = logging.getLogger("nvfp4_titan")
# prefill tag of transformers' apply_chat_template(continue_final_message=True) (utils/chat_template_utils.py)
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
        raise HarnessError(f"{name}={value!r}: give a whole number >= 1 (nvfp4-titan does not size batches itself)")
    return int(value)


def _device(device: str | None) -> torch.device:
    """``device``, or CUDA when there is one and the CPU otherwise: lm-eval's command line passes
    ``cuda:0`` by default, and ``HFLM`` falls back the same way when no such device exists."""
    if device and (not device.startswith("cuda") or torch.cuda.is_available()):
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class NVFP4TitanLM(TemplateLM):
    """lm-eval model ``nvfp4-titan`` (``--model_args`` keys):

    - ``path``: a training run or ``step-N`` folder, a converted NVFP4 folder or a float Hugging
      Face folder (``nvfp4_titan.evaluate.load_model``);
    - ``quant``: ``none`` or ``nvfp4-ptq`` (NVFP4 PTQ of a float model; from Python also a
      ``nvfp4.QATConfig``, PTQ of that kind);
    - ``dtype``: ``auto`` (a run: its ``training.mixed_precision_param``; a float folder:
      float32; a converted folder: as stored), ``float32``, ``bfloat16`` or ``float16``;
    - ``tokenizer``: a tokenizer file or folder instead of the model's own;
    - ``prefix_token_id``: the token documents are scored after (default: the BOS that
      ``tokenizer_config.json`` names, else EOS, as ``HFLM``);
    - ``max_length``: tokens per forward (default: the model's ``max_seq_len``);
    - ``max_gen_toks``: default generation budget (256, as ``HFLM``);
    - ``chat_template``: for ``--apply_chat_template``: "" (the tokenizer's own), ``plain``, or a
      jinja2 file (``nvfp4_titan.data.chat.load_chat_template``); default: a run's own
      ``dataset.chat_template`` where its recipe sets one (the template it trained with), else "";
    - ``batch_size``, ``device``: lm-eval's ``--batch_size`` (a number) and ``--device``.

    Raises:
        ConvertError: a path that is not a model, a bad ``quant``/``dtype``, a tokenizer with more
            tokens than the model, ``max_length`` beyond the model's. TokenizerError: no tokenizer.
        HarnessError: no ``path``, an argument it does not take, ``batch_size`` or a length that
            is not a positive whole number.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        quant: str = "none",
        dtype: str = "auto",
        tokenizer: str | None = None,
        prefix_token_id: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        chat_template: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,  # lm-eval passes it with batch_size; used by "auto" sizing only
        device: str | None = None,
        **unknown: object,
    ) -> None:
        super().__init__()
        if unknown:
            raise HarnessError(
                f"nvfp4-titan has no model argument {', '.join(sorted(unknown))}; it takes path, quant, dtype, "
                "tokenizer, prefix_token_id, max_length, max_gen_toks, chat_template (lm-eval's hf model's "
                "pretrained= is path= here)"
            )
        if path is None:
            raise HarnessError(
                "nvfp4-titan needs the model: --model_args path=PATH (a training run or step-N folder, a "
                "converted NVFP4 folder or a float Hugging Face folder)"
            )
        path = Path(path)
        self._batch_size = _positive_int(batch_size, "batch_size")
        self._max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        model, src = load_model(path, quant, dtype)
        self.encoder = model_encoder(path, tokenizer, prefix_token_id)
        if self.encoder.tokenizer.vocab_size > model.args.vocab_size:
            raise ConvertError(
                f"the tokenizer {self.encoder.path} has {self.encoder.tokenizer.vocab_size} tokens, more than "
                f"the model's vocab_size {model.args.vocab_size}: name the model's own with tokenizer=PATH"
            )
        self._max_length = model.args.max_seq_len if max_length is None else _positive_int(max_length, "max_length")
        if self._max_length > model.args.max_seq_len:
            raise ConvertError(
                f"max_length={self._max_length} exceeds the model's max_seq_len {model.args.max_seq_len}"
            )
        self._device = _device(device)
        self.model = model.to(self._device).eval()
        # a run is scored with the template it trained with, unless chat_template says otherwise
        recipe = src.config if src is not None else None
        self._recipe_template = chat_template is None and recipe is not None and bool(recipe.dataset.chat_template)
        self._chat_template_setting = recipe.dataset.chat_template if self._recipe_template else chat_template or ""
        self._path = path
        self._chat: ChatTemplate | None = None

    @property
    def eot_token_id(self) -> int:
        return self.encoder.eot_id

    @property
    def prefix_token_id(self) -> int:
        return self.encoder.prefix_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return str(self.encoder.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.encoder.encode(string, add_special_tokens)

    @torch.no_grad()
    def _log_probs(self, rows: list[list[int]]) -> torch.Tensor:
        """rows of token ids, right-padded with EOS -> float32 log-probabilities [B, L, vocab]."""
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [self.eot_token_id] * (width - len(r)) for r in rows], device=self._device)
        return F.log_softmax(self.model(x), dim=-1, dtype=torch.float32)

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        res = []
        order = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in order.get_batched(n=self.batch_size):
            if longest := max((len(cont) for _, _, cont in chunk if len(cont) > self.max_length), default=0):
                raise HarnessError(f"a continuation of {longest} tokens does not fit in max_length={self.max_length}")
            inputs = [(ctx + cont)[-(self.max_length + 1) :][:-1] for _, ctx, cont in chunk]
            log_probs = self._log_probs(inputs)
            for (request, _, cont), inp, lp in zip(chunk, inputs, log_probs):
                scored = lp[len(inp) - len(cont) : len(inp)]
                target = torch.tensor(cont, device=self._device)
                answer = (
                    float(scored.gather(1, target[:, None]).sum()),
                    bool((scored.argmax(-1) == target).all()),
                )
                res.append(answer)
                if request is not None:  # rolling windows are cached per document instead
                    self.cache_hook.add_partial("loglikelihood", request, answer)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        res = []
        order = Collator(
            [req.args for req in requests],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos_text = self.encoder.decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running generate_until requests")
        for chunk in order.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs["do_sample"]:
                raise HarnessError(
                    f"generation asks for sampling ({all_kwargs[0]}); nvfp4-titan generates greedily: "
                    "pass --gen_kwargs do_sample=false"
                )
            until = handle_stop_sequences(kwargs["until"], eos=eos_text)
            budget = kwargs["max_gen_toks"]
            if budget >= self.max_length:
                raise HarnessError(
                    f"max_gen_toks={budget} leaves no room for a context in max_length={self.max_length}"
                )
            prompts = [self.tok_encode(c)[-(self.max_length - budget) :] for c in contexts]
            for context, text in zip(contexts, self._greedy(prompts, until, budget)):
                text = postprocess_generated_text(text, until, None)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
                bar.update(1)
        bar.close()
        return order.get_original(res)

    def _greedy(self, prompts: list[list[int]], until: list[str], budget: int) -> list[str]:
        """Greedy continuations of ``prompts`` (token ids): each grows until EOS, a stop string in
        its text or ``budget`` tokens; the finished ones leave the batch."""
        new: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        for _ in range(budget):
            rows = [prompts[i] + new[i] for i in active]
            log_probs = self._log_probs(rows)
            last = log_probs[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])].argmax(-1).tolist()
            still = []
            for i, token in zip(active, last):
                if token == self.eot_token_id:
                    continue
                new[i].append(token)
                if not any(s and s in self.encoder.decode(new[i]) for s in until):
                    still.append(i)
            active = still
            if not active:
                break
        return [self.encoder.decode(ids) for ids in new]

    def _template(self) -> ChatTemplate:
        """The chat template (loaded on first use: base models have none). Raises RowError naming
        this model's ``chat_template`` argument where the loader names the recipe key, and a run's
        template file not found from here (the recipe's relative paths are from where it trained)."""
        if self._chat is None:
            setting = self._chat_template_setting
            if self._recipe_template and setting != "plain":
                recipe_path(self._path, "dataset.chat_template", setting, CHAT_TEMPLATE, RowError)
            eos = self.encoder.decode([self.eot_token_id], skip_special_tokens=False)
            try:
                self._chat = load_chat_template(self.encoder.path, setting, eos)
            except RowError as e:
                if self._recipe_template:
                    raise RowError(f"{self._path}'s recipe: {e}; or pass {CHAT_TEMPLATE}") from None
                raise RowError(str(e).replace("dataset.chat_template", "--model_args chat_template")) from None
        return self._chat

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template's source for lm-eval's records (``--apply_chat_template``; named templates
        are a transformers tokenizer's: this model has the one ``chat_template`` sets)."""
        if not chat_template:
            return None
        if isinstance(chat_template, str):
            raise HarnessError(
                f"--apply_chat_template {chat_template}: nvfp4-titan has one chat template; name a file "
                "with --model_args chat_template=PATH (or plain) and pass --apply_chat_template alone"
            )
        return self._template().template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt of ``chat_history``: with the generation prompt, or (lm-eval's ``gen_prefix``)
        ending inside the final message, as transformers' ``continue_final_message=True`` cuts it."""
        if add_generation_prompt:
            return self._template().render(chat_history, add_generation_prompt=True)
        tagged = [*chat_history[:-1], {**chat_history[-1], "content": chat_history[-1]["content"] + _CONTINUE_TAG}]
        text = self._template().render(tagged)
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
