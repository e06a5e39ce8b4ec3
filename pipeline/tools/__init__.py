"""Tools: a registry of fs, git, terminal and speech tools, safe by construction.

Build the server's registry from settings with :func:`build_registry`; the response harness
offers its enabled tools to the model and runs the calls (:mod:`pipeline.tools.calls`).
Every module documents its own safety rules; :mod:`pipeline.tools.safety` holds the path
confinement they share.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import openai

from core.config import Settings
from pipeline.tools.calls import PlannedCall, assistant_message, plan_call, run_calls
from pipeline.tools.fs import fs_tools
from pipeline.tools.git import git_tools
from pipeline.tools.registry import (
    Tool,
    ToolLimits,
    ToolOutcome,
    ToolRegistry,
    ToolStepLimitError,
    function_name,
)
from pipeline.tools.safety import ToolRefusal, Workspace
from pipeline.tools.speech import speech_provider_info, speech_tools
from pipeline.tools.terminal import terminal_tools

__all__ = [
    "PlannedCall",
    "Tool",
    "ToolLimits",
    "ToolOutcome",
    "ToolRefusal",
    "ToolRegistry",
    "ToolStepLimitError",
    "Workspace",
    "assistant_message",
    "build_registry",
    "function_name",
    "plan_call",
    "run_calls",
    "speech_provider_info",
]


def build_registry(settings: Settings, *, audio: openai.AsyncOpenAI | None = None) -> ToolRegistry:
    """Every tool, enabled or not as the settings say; creates the workspace folder.

    Args:
        settings: ``ENABLE_*``, ``DISABLED_TOOLS``, ``ALLOW_FS_BASE`` and the limits.
        audio: The client whose audio endpoints the speech tools use (None: speech disabled).
    """
    workspace = Workspace(settings.fs_base, max_path_chars=settings.fs_max_path_chars)

    def switch(flag: bool, name: str) -> tuple[bool, str | None]:
        return (True, None) if flag else (False, f"{name}=false")

    tools: list[Tool[Any]] = []
    enabled, reason = switch(settings.enable_fs, "ENABLE_FS")
    tools += fs_tools(workspace, enabled=enabled, disabled_reason=reason,
                      read_max_bytes=settings.tool_output_max_bytes,
                      write_max_bytes=settings.fs_max_write_bytes, timeout_s=settings.tool_timeout_s)
    enabled, reason = switch(settings.enable_git, "ENABLE_GIT")
    tools += git_tools(workspace, enabled=enabled, disabled_reason=reason,
                       path_env=settings.terminal_path, timeout_s=settings.git_timeout_s,
                       output_max_bytes=settings.tool_output_max_bytes)
    enabled, reason = switch(settings.enable_terminal, "ENABLE_TERMINAL")
    tools += terminal_tools(workspace, enabled=enabled, disabled_reason=reason,
                            allowlist=settings.terminal_allowlist, path_env=settings.terminal_path,
                            timeout_s=settings.terminal_timeout_s,
                            max_timeout_s=settings.terminal_max_timeout_s,
                            max_args=settings.terminal_max_args,
                            max_arg_chars=settings.terminal_max_arg_chars,
                            output_max_bytes=settings.tool_output_max_bytes)
    enabled, reason = switch(settings.enable_speech, "ENABLE_SPEECH")
    tools += speech_tools(workspace, audio, enabled=enabled, disabled_reason=reason,
                          stt_model=settings.default_stt_model, tts_model=settings.default_tts_model,
                          voice=settings.default_tts_voice,
                          max_audio_bytes=settings.speech_max_audio_bytes,
                          max_text_chars=settings.speech_max_text_chars,
                          timeout_s=settings.tool_timeout_s)
    off = set(settings.disabled_tools)
    tools = [
        dataclasses.replace(tool, enabled=False, disabled_reason="in DISABLED_TOOLS")
        if tool.name in off and tool.enabled else tool
        for tool in tools
    ]
    limits = ToolLimits(
        max_steps=settings.max_tool_steps, max_calls_per_step=settings.max_tool_calls_per_step,
        result_max_chars=settings.tool_result_max_chars,
        arguments_max_bytes=settings.tool_arguments_max_bytes,
    )
    return ToolRegistry(tools, limits=limits, info={"workspace": str(workspace.base)})
