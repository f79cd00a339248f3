"""Lets tests import their shared helpers (train_helpers) and the repository's configs, and gives
the session one JAX compilation cache."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CACHE_SETTINGS = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs')


@pytest.fixture(scope='session', autouse=True)
def session_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this process and every command it starts.

  The tests' tiny runs compile the same programs again and again, and compiling is most of a
  tiny run's time: tests/train_test.py ran 1.4x as fast with it. A cache the caller set is kept.
  """
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    yield
    return
  import jax  # pylint: disable=g-import-not-at-top
  before = [getattr(jax.config, name) for name in CACHE_SETTINGS]
  directory = str(tmp_path_factory.getbasetemp() / 'jax_cache')
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv('JAX_COMPILATION_CACHE_DIR', directory)
    # Small programs too (JAX caches only those compiling for over a second by default): the
    # eager ops of initialisation are dozens of them.
    patch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
    set_compilation_cache(directory, 0.0)
    yield
  set_compilation_cache(*before)


@pytest.fixture
def no_compilation_cache():
  """This process compiles without a persistent cache, for one test."""
  import jax  # pylint: disable=g-import-not-at-top
  before = [getattr(jax.config, name) for name in CACHE_SETTINGS]
  set_compilation_cache(None, before[1])
  yield
  set_compilation_cache(*before)


def set_compilation_cache(directory, min_compile_time_secs):
  """This process's persistent compilation cache (None: none), in use from its next compile."""
  import jax  # pylint: disable=g-import-not-at-top
  # pylint: disable-next=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update(CACHE_SETTINGS[0], directory)
  jax.config.update(CACHE_SETTINGS[1], min_compile_time_secs)
  # JAX decides once per process whether the cache is in use.
  compilation_cache.reset_cache()
