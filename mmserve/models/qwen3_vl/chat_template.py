"""Qwen3-VL's chat templates: Instruct, and Thinking (which opens '<think>' for the answer and keeps the last
turns' reasoning_content).

INSTRUCT renders as Qwen3-VL-8B-Instruct's shipped template (checked against a verbatim, hash-pinned copy of it in a
public repository): only the first message may be a system message (later ones are dropped), and an assistant turn's
tool calls start on a new line when its message has content. THINKING keeps Qwen3's thinking-template rules (later
system messages rendered as turns); no public copy of Qwen3-VL-*-Thinking's own template was found to check it.
"""

_SYSTEM = (
    "{%- if messages[0].content is string %}{{- messages[0].content }}"
    "{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
)
_HEADER = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}" + _SYSTEM + "{{- '\\n\\n' }}{%- endif %}"
    "{{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}" + _SYSTEM +
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
)
_USER_CONTENT = (
    "{%- if message.content is string %}{{- message.content }}"
    "{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}"
)
_TEXT_CONTENT = (
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = namespace(value='') %}{%- for item in message.content %}"
    "{%- if 'text' in item %}{%- set content.value = content.value + item.text %}{%- endif %}{%- endfor %}"
    "{%- set content = content.value %}{%- endif %}"
)
_TOOL_CALLS = (  # formatted with what makes the first call start a new line: the message's content or the text
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and {has_content}) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}"
    "{%- endif %}{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}"
)
_TOOL = (
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}" + _USER_CONTENT + "{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
)
_USER = (  # formatted with the roles rendered as user-like turns
    "{%- if {roles} %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}" + _USER_CONTENT + "{{- '<|im_end|>\\n' }}"
)

INSTRUCT = (
    _HEADER + "{%- for message in messages %}" + _USER.replace("{roles}", "message.role == 'user'") +
    "{%- elif message.role == 'assistant' %}" + _TEXT_CONTENT +
    "{{- '<|im_start|>' + message.role + '\\n' + content }}" + _TOOL_CALLS.replace("{has_content}", "message.content") +
    "{{- '<|im_end|>\\n' }}" +
    _TOOL + "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The Thinking checkpoints keep reasoning only for turns after the last user query and open the answer in <think>.
THINKING = (
    _HEADER +
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' %}" + _TEXT_CONTENT +
    "{%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}" +
    _USER.replace("{roles}", "message.role == 'user' or (message.role == 'system' and not loop.first)") +
    "{%- elif message.role == 'assistant' %}" + _TEXT_CONTENT +
    "{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}{%- set reasoning_content = message.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}" +
    _TOOL_CALLS.replace("{has_content}", "content") +
    "{{- '<|im_end|>\\n' }}" + _TOOL + "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}"
)
