# lungseg: `make test` (unit tests + notebooks in quick mode), `make run` (every notebook
# in full mode, outputs stored in place, without progress bars: train() prints a line per epoch), `make lab` (JupyterLab on notebooks/).
# Each target creates .venv and installs requirements.txt into it when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: setup test run lab clean-cache

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

test: $(STAMP)
	LUNGSEG_QUICK=$${LUNGSEG_QUICK:-1} $(PY) -m pytest tests notebooks --nbval-lax --nbval-cell-timeout=900 -p no:cacheprovider

run: $(STAMP)
	@for nb in $(NOTEBOOKS); do \
		echo "== $$nb"; \
		LUNGSEG_QUICK=0 TQDM_DISABLE=1 $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
			--ExecutePreprocessor.timeout=14400 "$$nb" || exit 1; \
	done

lab: $(STAMP)
	$(PY) -m jupyter lab notebooks/

clean-cache:
	rm -rf "$${LUNGSEG_CACHE_DIR:-$${XDG_CACHE_HOME:-$$HOME/.cache}/lungseg}"
