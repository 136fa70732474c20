"""Which endpoints open a think block in their chat template, and the setting that says so.

Some chat templates end the prompt with ``<think>\\n``: the model's reply then
starts inside its reasoning and only a lone ``</think>`` appears in the
stream. Nothing in the stream says so before that tag, and speech cannot be
taken back, so the endpoint client decides how a reply's first words are
read before they arrive, from what can be known without waiting:

1. the setting (``think_block``: ``"template"`` or ``"none"``), per agent
   (``llm[0].think_block``) or per command (``--think-block``);
2. what earlier replies of the same base URL and model showed (the process
   remembers it; the session warm-up request teaches it before the first turn);
3. the model name: the families in :data:`TEMPLATE_OPENED_FAMILIES`, whose
   published templates open the block, hold a reply's first words until the
   stream decides (their answers come after the reasoning anyway);
4. otherwise the reply streams at once. If it then shows a lone
   ``</think>`` (the guess was wrong), what came before was spoken once; the
   endpoint is remembered as template-opened and one warning names the
   setting that avoids it.

Reasoning in its own field (``reasoning_content``, ``reasoning``, typed
parts) or between ``<think>`` and ``</think>`` is recognised in every case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

ThinkBlock = Literal["auto", "template", "none"]
"""``auto``: decide as above; ``template``: every reply starts inside a think
block the template opened (text up to ``</think>`` is reasoning); ``none``:
never (a stray ``</think>`` is dropped, the rest is spoken as it streams)."""

THINK_BLOCK_CHOICES: Final[tuple[ThinkBlock, ...]] = ("auto", "template", "none")


@dataclass(frozen=True, slots=True)
class TemplateFamily:
    """Model names whose chat template opens a think block.

    Attributes:
        name: the family, as its authors name it.
        all_of: lower-case fragments that must all appear in the model name.
        source: where the template's behaviour is documented.
    """

    name: str
    all_of: tuple[str, ...]
    source: str


TEMPLATE_OPENED_FAMILIES: Final[tuple[TemplateFamily, ...]] = (
    TemplateFamily(
        "DeepSeek-R1 and its distills (DeepSeek-R1-Distill-Qwen/Llama, R1-0528)",
        ("deepseek-r1",),
        "huggingface.co/deepseek-ai/DeepSeek-R1 (usage recommendations: the template "
        "enforces '<think>\\n'; tokenizer_config.json chat_template); "
        "github.com/deepseek-ai/DeepSeek-R1 issues 352 and 526 (output has only </think>)",
    ),
    TemplateFamily(
        "R1 distills published under other names",
        ("r1-distill",),
        "huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-7B (same template)",
    ),
    TemplateFamily(
        "QwQ",
        ("qwq",),
        "huggingface.co/Qwen/QwQ-32B (usage guidelines: the chat template adds "
        "'<think>\\n', so the response may lack the opening tag)",
    ),
    TemplateFamily(
        "Qwen3 thinking variants (Qwen3-*-Thinking-2507, Qwen3-Next-*-Thinking)",
        ("qwen3", "thinking"),
        "huggingface.co/Qwen/Qwen3-30B-A3B-Thinking-2507 (the default chat template "
        "includes <think>; output containing only </think> is normal)",
    ),
)


def template_family(model: str) -> TemplateFamily | None:
    """The family whose template opens a think block, if ``model`` names one.

    The name is matched case-insensitively anywhere in ``model``, so
    ``deepseek-ai/DeepSeek-R1-Distill-Qwen-7B``, ``deepseek-r1:8b`` and
    ``qwq-32b-q4_k_m.gguf`` all match.
    """
    name = model.lower()
    for family in TEMPLATE_OPENED_FAMILIES:
        if all(part in name for part in family.all_of):
            return family
    return None


def leading_from_setting(setting: ThinkBlock) -> bool | None:
    """The client's ``leading_reasoning`` for a ``think_block`` setting (``None``: auto).

    Raises:
        ValueError: an unknown setting.
    """
    if setting == "template":
        return True
    if setting == "none":
        return False
    if setting == "auto":
        return None
    raise ValueError(f"think_block must be one of {', '.join(THINK_BLOCK_CHOICES)}")
