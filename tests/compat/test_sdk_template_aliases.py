"""The template read API as the stock SDK calls it: aliases (Template.exists) and the list."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from e2b import Template
from e2b.api.client.models.template import Template as TemplateModel
from e2b.exceptions import TemplateException

pytestmark = pytest.mark.stack


def test_built_templates_exist_by_alias_and_unknown_ones_do_not(sdk_env: dict[str, str]) -> None:
    assert Template.exists("base") is True
    assert Template.exists("code-interpreter-v1") is True
    assert Template.exists("no-such-template") is False
    with pytest.raises(TemplateException, match="invalid template alias"):
        Template.exists("Not_A_Valid..Alias!")


def test_templates_are_listed_in_e2b_shape_and_need_the_key(running_stack: Any) -> None:
    url = f"{running_stack.sandbox_url}/templates"
    assert httpx.get(url).status_code == 401
    assert httpx.get(f"{url}/aliases/base").status_code == 401
    response = httpx.get(url, headers={"X-API-KEY": running_stack.api_key})
    assert response.status_code == 200, response.text
    listed = {t.template_id: t for t in (TemplateModel.from_dict(item) for item in response.json())}
    assert {"base", "code-interpreter-v1"} <= set(listed)
    assert listed["base"].aliases == ["base"]
    assert listed["base"].memory_mb > 0
