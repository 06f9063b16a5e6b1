from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import Field, model_validator

from services.core.schemas import RequestModel, ResponseModel

# arn:<partition>:kms:<region>:<account>:key/<id>  (aliases are refused: an alias can be re-pointed at another key)
KMS_KEY_ARN = r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:[0-9]{12}:key/[A-Za-z0-9-]+$"
IAM_ROLE_ARN = r"^arn:aws[a-z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]+$"


class KeyIn(RequestModel):
    provider: Literal["managed", "aws-kms"]
    key_arn: str | None = Field(None, max_length=2048, pattern=KMS_KEY_ARN, description="aws-kms: the key's ARN")
    role_arn: str | None = Field(
        None,
        max_length=2048,
        pattern=IAM_ROLE_ARN,
        description="aws-kms: the role in the key's account that Vecta assumes (with the organization's external "
        "id) to use the key; omit when the key policy grants Vecta's own principal",
    )

    @model_validator(mode="after")
    def _arns(self) -> KeyIn:
        if self.provider == "aws-kms" and not self.key_arn:
            raise ValueError("key_arn is required for provider 'aws-kms'")
        if self.provider == "managed" and (self.key_arn or self.role_arn):
            raise ValueError("key_arn and role_arn apply only to provider 'aws-kms'")
        return self


class RotateIn(RequestModel):
    key_arn: str | None = Field(
        None, max_length=2048, pattern=KMS_KEY_ARN, description="aws-kms: move to this key (default: the same key)"
    )
    role_arn: str | None = Field(None, max_length=2048, pattern=IAM_ROLE_ARN)
    rekey: bool = Field(
        False,
        description="Also replace each running cluster's data key and re-encrypt its files in the background "
        "(the clusters keep serving). Without it only the wrapping of the data keys changes.",
    )


class KeyVersionOut(ResponseModel):
    version: int
    key_arn: str | None
    role_arn: str | None
    created_at: dt.datetime


class KeyOut(ResponseModel):
    id: str
    project_id: str
    provider: Literal["managed", "aws-kms"]
    key_arn: str | None = Field(description="aws-kms: the current version's key")
    role_arn: str | None
    external_id: str | None = Field(
        description="aws-kms with role_arn: the sts:ExternalId Vecta presents; require it in the role's trust policy"
    )
    is_default: bool = Field(description="The project's managed key, used by clusters created without a key id")
    status: Literal["ENABLED", "UNAVAILABLE", "DELETED"]
    status_reason: str | None
    current_version: int
    versions: list[KeyVersionOut]
    clusters: int = Field(description="Clusters (not deleted) whose data key this key wraps")
    last_checked_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime


class RotateOut(KeyOut):
    rewrapped_clusters: int = Field(description="Clusters whose data key is now wrapped by the new version")
    rekey_clusters: list[str] = Field(description="Clusters whose data key is being replaced in the background")


class AwsSetupOut(ResponseModel):
    external_id: str
    role_session_name: str
    trust_policy_condition: dict[str, dict[str, str]]
