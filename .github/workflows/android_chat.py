"""Chat with the edgellm demo app on a running emulator through adb (used by android.yml).

Waits for the status line to say "Ready", types the question into the input field, taps Send, waits for the
TTFT line and checks the transcript contains the expected word. Reads the screen with uiautomator dumps.
Usage: python3 android_chat.py QUESTION EXPECTED_WORD
"""
import re
import subprocess
import sys
import time


def adb(*args: str) -> str:
    return subprocess.run(["adb", *args], capture_output=True, text=True, check=False).stdout


def screen() -> str:
    adb("shell", "uiautomator", "dump", "/sdcard/ui.xml")
    return adb("shell", "cat", "/sdcard/ui.xml")


def wait_for(pattern: str, seconds: int) -> str:
    for _ in range(seconds // 5):
        ui = screen()
        if re.search(pattern, ui):
            return ui
        time.sleep(5)
    sys.exit(f"timed out waiting for {pattern!r}; last screen:\n{screen()[:3000]}")


def tap(ui: str, cls: str) -> None:
    m = re.search(rf'class="{re.escape(cls)}"[^>]*bounds="\[(\d+),(\d+)\]\[(\d+),(\d+)\]"', ui)
    if not m:
        sys.exit(f"no {cls} on screen")
    x1, y1, x2, y2 = map(int, m.groups())
    adb("shell", "input", "tap", str((x1 + x2) // 2), str((y1 + y2) // 2))


question, expected = sys.argv[1], sys.argv[2]
ui = wait_for(r'text="Ready', 600)
print(re.search(r'text="(Ready[^"]*)"', ui).group(1))
tap(ui, "android.widget.EditText")
adb("shell", "input", "text", question.replace(" ", "%s"))
tap(screen(), "android.widget.Button")
ui = wait_for(r'text="TTFT', 600)
print(re.search(r'text="(TTFT[^"]*)"', ui).group(1))
if expected not in ui:
    sys.exit(f"the answer does not mention {expected!r}:\n{ui[:3000]}")
print("answer contains", expected)
print(adb("logcat", "-d", "-s", "AndroidRuntime:E")[-3000:])
