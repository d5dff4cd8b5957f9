#!/usr/bin/python3
"""Drives the Vireo manager in headless Chromium (Debian's chromium, chromium-driver and
python3-selenium): creates a VM through the New wizard, starts it, reads its serial output in
the xterm.js console, pauses, resumes, stops and deletes it; then shows a qemu-engine VM's screen
in noVNC; on the Guest tab adds a shared folder to the stopped VM and removes it. Screenshots of every step go to the artifacts directory. Exits non-zero, saying which
step failed, on any failure.

usage: manager_ui.py URL_WITH_TOKEN PROBE_KERNEL ARTIFACTS_DIR [QEMU_VM_NAME [INSTALLER_ISO [SHARE_DIR]]]
"""
import os
import re
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

url, kernel, artifacts = sys.argv[1], sys.argv[2], sys.argv[3]
qemu_vm = sys.argv[4] if len(sys.argv) > 4 else None
installer_iso = sys.argv[5] if len(sys.argv) > 5 else None
share_dir = sys.argv[6] if len(sys.argv) > 6 else None
os.makedirs(artifacts, exist_ok=True)

options = webdriver.ChromeOptions()
options.binary_location = "/usr/bin/chromium"
for argument in ["--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                 "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--metrics-recording-only"]:
    options.add_argument(argument)
driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
step_number = 0


def shot(name):
    global step_number
    step_number += 1
    driver.save_screenshot(os.path.join(artifacts, f"{step_number:02d}-{name}.png"))


def wait(description, condition, timeout=60):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: condition())
    except Exception:
        shot("failed-" + description.replace(" ", "-")[:40])
        status = driver.find_element(By.ID, "status").text
        logs = "\n".join(str(entry) for entry in driver.get_log("browser"))[-3000:]
        raise SystemExit(f"step failed: {description} (status line: {status!r})\nbrowser log:\n{logs}")


def row_state(name):
    # Read in one script: the list is re-rendered on every event, so elements go stale.
    text = driver.execute_script(
        "const row = Array.from(document.querySelectorAll('#vm-list tbody tr')).find(r => r.dataset.name === arguments[0]);"
        "return row ? row.children[1].textContent : null;", name)
    return text.split(" ")[0] if text else None


def click(element_id):
    wait(f"{element_id} enabled", lambda: driver.find_element(By.ID, element_id).is_enabled(), 30)
    driver.find_element(By.ID, element_id).click()


def terminal_text():
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#terminal .xterm-rows > div')).map(r => r.textContent).join('\\n')")


def last_tick():
    # The probe prints "tick N"; the terminal shows only its last rows, so counting lines would
    # stop rising once the screen is full: the newest number says whether the guest moved.
    numbers = [int(n) for n in re.findall(r"tick (\d+)", terminal_text())]
    return max(numbers) if numbers else -1


try:
    started = time.time()
    driver.get(url)
    wait("page ready", lambda: driver.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", 30)
    print(f"page interactive after {time.time() - started:.2f} s")
    shot("manager")

    # The New wizard: a direct-kernel VM booting the probe guest.
    click("btn-new")
    wait("wizard open", lambda: driver.find_element(By.ID, "wizard").get_attribute("open") is not None)
    driver.find_element(By.ID, "wz-name").send_keys("ui-vm")
    driver.find_element(By.CSS_SELECTOR, "input[name='wz-source'][value='kernel']").click()
    driver.find_element(By.ID, "wz-kernel").send_keys(kernel)
    driver.find_element(By.ID, "wz-cmdline").send_keys("console=ttyS0 probe=ticker spin=5000000")
    disk = driver.find_element(By.ID, "wz-disk")
    disk.clear()
    disk.send_keys("0")
    driver.execute_script("const m = document.getElementById('wz-memory'); m.value = 128; m.dispatchEvent(new Event('input', {bubbles: true}));")
    driver.find_element(By.CSS_SELECTOR, "#wz-network option[value='none']").click()
    driver.execute_script("document.getElementById('wizard-form').dispatchEvent(new Event('input'))")
    preview = driver.find_element(By.ID, "wz-preview").text
    assert "ui-vm" in preview and "128 MiB" in preview and "no disk" in preview, preview
    shot("wizard")
    click("wz-create")
    wait("VM listed as stopped", lambda: row_state("ui-vm") == "stopped")
    shot("created")

    click("btn-start")
    wait("VM running", lambda: row_state("ui-vm") == "running")
    shot("running")

    driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='console']").click()
    click("console-connect")
    wait("serial output in the console", lambda: "tick" in terminal_text(), 60)
    shot("console")

    click("btn-pause")
    wait("VM paused", lambda: row_state("ui-vm") == "paused")
    time.sleep(0.5)   # what the guest printed just before the pause reaches the page
    before = last_tick()
    time.sleep(1.5)
    assert last_tick() == before, "the console moved while paused"
    shot("paused")
    click("btn-resume")
    wait("VM running again", lambda: row_state("ui-vm") == "running")
    wait("output after resume", lambda: last_tick() > before, 60)
    shot("resumed")

    driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='charts']").click()
    time.sleep(5)
    points = driver.execute_script("return window.Chart ? Object.values(Chart.instances).map(c => c.data.labels.length) : []")
    assert points and min(points) >= 1, f"charts have no points: {points}"
    shot("charts")

    click("btn-stop")
    wait("VM stopped", lambda: row_state("ui-vm") == "stopped", 60)
    shot("stopped")

    if share_dir:
        # The Guest tab: a shared folder added to the stopped VM, shown in its details, removed;
        # commands and files wait for a running VM.
        driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='guest']").click()
        wait("guest tab ready", lambda: driver.find_element(By.ID, "share-add").is_enabled())
        assert not driver.find_element(By.ID, "exec-run").is_enabled(), "Run is enabled on a stopped VM"
        driver.find_element(By.ID, "share-path").send_keys(share_dir)
        driver.find_element(By.ID, "share-tag").send_keys("webshare")
        driver.find_element(By.ID, "share-mount").send_keys("/srv/webshare")
        driver.find_element(By.ID, "share-readonly").click()
        click("share-add")
        wait("share listed", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#share-list tr[data-tag='webshare']")) == 1)
        row = driver.find_element(By.CSS_SELECTOR, "#share-list tr[data-tag='webshare']").text
        assert share_dir in row and "read-only" in row and "at /srv/webshare" in row, row
        details = driver.find_element(By.ID, "tab-details").get_attribute("textContent")
        assert f"{share_dir} as webshare (read-only)" in details, details
        shot("share-added")
        driver.find_element(By.CSS_SELECTOR, "#share-list tr[data-tag='webshare'] button").click()
        wait("share removed", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#share-list tr[data-tag='webshare']")) == 0)
        shot("share-removed")

        # Storage: a dir pool over the same directory, a thin volume made in it, a bad name
        # refused in the dialog, the pool deleted (its volume stays on disk).
        click("btn-storage")
        wait("storage open", lambda: driver.find_element(By.ID, "storage").get_attribute("open") is not None)
        driver.find_element(By.ID, "pool-name").send_keys("bad pool")
        driver.find_element(By.ID, "pool-source").send_keys(share_dir)
        click("pool-create")
        wait("bad pool name refused", lambda: "'bad pool' must be 1 to 32 characters" in driver.find_element(By.ID, "storage-error").text)
        driver.find_element(By.ID, "pool-name").clear()
        driver.find_element(By.ID, "pool-name").send_keys("uipool")
        driver.find_element(By.CSS_SELECTOR, "#pool-type option[value='dir']").click()
        click("pool-create")
        wait("pool listed", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#pool-list tr[data-name='uipool']")) == 1)
        wait("pool selected", lambda: driver.find_element(By.ID, "pool-title").text == "Volumes of uipool")
        driver.find_element(By.ID, "volume-name").send_keys("ui.qcow2")
        size = driver.find_element(By.ID, "volume-size")
        size.clear()
        size.send_keys("1")
        click("volume-create")
        wait("volume listed", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#volume-list tr[data-name='ui.qcow2']")) == 1)
        volume = driver.find_element(By.CSS_SELECTOR, "#volume-list tr[data-name='ui.qcow2']").text
        assert "qcow2" in volume and "1 GiB" in volume and "free" in volume, volume
        assert os.path.exists(os.path.join(share_dir, "ui.qcow2")), "the volume's file"
        shot("storage")
        driver.find_element(By.CSS_SELECTOR, "#pool-list tr[data-name='uipool'] button").click()
        wait("pool deleted", lambda: len(driver.find_elements(By.CSS_SELECTOR, "#pool-list tr[data-name='uipool']")) == 0)
        assert os.path.exists(os.path.join(share_dir, "ui.qcow2")), "deleting a pool leaves its volumes"
        click("storage-close")
        wait("storage closed", lambda: driver.find_element(By.ID, "storage").get_attribute("open") is None)
        driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='details']").click()

    click("btn-delete")
    wait("confirmation", lambda: driver.find_element(By.ID, "confirm").get_attribute("open") is not None)
    shot("delete-confirm")
    driver.find_element(By.ID, "confirm-ok").click()
    wait("VM gone", lambda: row_state("ui-vm") is None)
    shot("deleted")

    if installer_iso:
        # The wizard's unattended step: an installer ISO, answered (created, not started).
        click("btn-new")
        wait("wizard open again", lambda: driver.find_element(By.ID, "wizard").get_attribute("open") is not None)
        for field in ["wz-name", "wz-cmdline"]:
            driver.find_element(By.ID, field).clear()
        driver.find_element(By.ID, "wz-name").send_keys("ui-install")
        driver.find_element(By.CSS_SELECTOR, "#wz-ostype option[value='debian-64']").click()
        driver.find_element(By.CSS_SELECTOR, "input[name='wz-source'][value='iso']").click()
        driver.find_element(By.ID, "wz-iso").send_keys(installer_iso)
        driver.find_element(By.ID, "wz-unattended").click()
        driver.find_element(By.ID, "wz-user").send_keys("alice")
        driver.find_element(By.ID, "wz-password").send_keys("typed in the browser")
        driver.find_element(By.ID, "wz-locale").send_keys("de_DE")
        driver.find_element(By.ID, "wz-packages").send_keys("curl, htop")
        driver.find_element(By.CSS_SELECTOR, "#wz-tpm option[value='on']").click()
        driver.execute_script("document.getElementById('wizard-form').dispatchEvent(new Event('input'))")
        preview = driver.find_element(By.ID, "wz-preview").text
        assert "unattended install as alice" in preview and "typed in the browser" not in preview and "a TPM 2.0 (swtpm)" in preview, preview
        shot("wizard-unattended")
        click("wz-create")
        wait("installer VM listed", lambda: row_state("ui-install") == "stopped")
        # The wizard's TPM choice reached the VM: its details say so.
        driver.execute_script("Array.from(document.querySelectorAll('#vm-list tbody tr')).find(r => r.dataset.name === 'ui-install').click()")
        driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='details']").click()
        wait("installer VM's TPM", lambda: "TPM 2.0 (swtpm)" in driver.find_element(By.ID, "tab-details").text)
        shot("created-unattended")

    if qemu_vm:
        wait("qemu VM listed", lambda: row_state(qemu_vm) == "running")
        driver.execute_script("Array.from(document.querySelectorAll('#vm-list tbody tr')).find(r => r.dataset.name === arguments[0]).click()", qemu_vm)
        driver.find_element(By.CSS_SELECTOR, "#tabs button[data-tab='display']").click()
        click("display-connect")
        wait("noVNC connected", lambda: driver.find_element(By.ID, "display-state").text.startswith("connected"), 60)
        # The screen is drawn: the canvas has the guest's size and is not one flat colour.
        wait("screen drawn", lambda: driver.execute_script("""
            const canvas = document.querySelector('#screen canvas');
            if (!canvas || canvas.width < 300) return false;
            const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
            const seen = new Set();
            for (let i = 0; i < data.length; i += 4 * 97) seen.add(data[i] << 16 | data[i + 1] << 8 | data[i + 2]);
            return seen.size > 1;"""), 60)
        shot("display")
        driver.find_element(By.ID, "display-text").send_keys("vireo")
        click("display-type")
        shot("display-typed")
    print("manager UI: every step passed")
finally:
    driver.quit()
