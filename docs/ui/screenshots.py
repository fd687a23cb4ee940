"""The screenshots in docs/ui/: each page of a running `loratune ui` at 1280x800, in Debian's chromium.

loratune ui --port 7870 &          # on a runs folder with a finished run and a second one to compare
python docs/ui/screenshots.py http://127.0.0.1:7870/ RUN OTHER_RUN "a prompt for Try it"
"""

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).parent


def main(url: str, run: str, other: str, prompt: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})

        def shot(name: str, wait: str) -> None:
            page.locator(wait).first.wait_for(timeout=300_000)
            page.wait_for_timeout(800)  # the charts' last frame
            page.screenshot(path=str(OUT / f"{name}.png"))

        page.goto(url + "#/runs")
        shot("runs", "table.runs tbody tr[data-run]")
        page.goto(url + f"#/run/{run}")
        shot("run", ".chart[data-points] canvas")
        page.evaluate("document.querySelector('.sections').scrollIntoView()")
        shot("run-details", ".sections table.samples")
        page.goto(url + "#/new")
        page.select_option("#preset", "quickstart")
        page.fill("#run-name", "quickstart-r16")
        page.fill("#f-lora_r", "16")
        page.fill("#f-learning_rate", "5e-4")
        page.locator("[data-field=learning_rate] .warn").wait_for()
        page.click("#check-plan")
        page.locator("#use-it").wait_for(timeout=300_000)
        page.evaluate("window.scrollTo(0, 0)")
        shot("new-run", "#use-it")
        page.goto(url + f"#/compare?runs={run},{other}")
        shot("compare", "#compare-chart canvas")
        page.goto(url + f"#/try?run={run}")
        page.locator("#try-adapter option").first.wait_for(state="attached")
        page.fill("#try-message", prompt)
        page.click("#ask")
        shot("try", "#answer-base .turn.model:not(.streaming)")
        browser.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
