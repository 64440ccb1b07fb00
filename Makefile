# The two commands of the quick start: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install run test chromium

# Re-installs only when one of these files changes.
# constraints.txt holds every dependency's dependency at the version the suite passed with.
$(VENV)/installed.stamp: requirements.txt requirements-nodeps.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -c constraints.txt
	$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt -c constraints.txt
	touch $@

install: $(VENV)/installed.stamp

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	$(PY) -m photobooth.dev run

# The browser test needs Debian's chromium, and a CJK font so its screenshots show the Chinese
# words (the language menu); install them when missing (root, or sudo).
BROWSER_PACKAGES := chromium fontconfig fonts-wqy-microhei
chromium:
	@{ command -v chromium && fc-list :lang=zh | grep -q .; } >/dev/null 2>&1 || { \
	  echo "Installing Debian's $(BROWSER_PACKAGES) for the browser test"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(BROWSER_PACKAGES); \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq $(BROWSER_PACKAGES); fi; }

# Two processes (pytest-xdist), each with its own Redis, data folder and test database; whole
# modules go to one process (--dist loadfile). TEST_PROCESSES=1 runs them in this one.
TEST_PROCESSES ?= 2
test: install chromium
	$(PY) -m pytest $(if $(filter 1,$(TEST_PROCESSES)),,-n $(TEST_PROCESSES) --dist loadfile)
