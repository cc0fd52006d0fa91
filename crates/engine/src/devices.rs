//! Device operations: register, show, list, update, delete, secrets, freezing.

use ioda_mqtt::codec::reason;
use ioda_store::{DeviceFilter, DevicePage, DeviceUpdate, InitialDesired, StoreError};
use ioda_types::validate::{Rejection, check_value};
use ioda_types::{Device, DeviceAuth, DeviceStatus, PlatformEvent, Product, StatusCause, ids};
use serde_json::Value;

use crate::products::check_opt_len;
use crate::{EngineError, Platform, invalid, random_bytes};

/// Authentication settings given at registration.
#[derive(Debug, Clone, Default)]
pub struct NewDeviceAuth {
    pub auth_type: Option<String>,
    pub secret: Option<String>,
    pub fingerprint: Option<String>,
    pub secure_access: Option<bool>,
    pub timeout: Option<i64>,
}

/// What a caller supplies to register a device.
#[derive(Debug, Clone, Default)]
pub struct NewDevice {
    pub device_id: Option<String>,
    pub node_id: String,
    pub product_id: String,
    pub device_name: Option<String>,
    pub description: Option<String>,
    pub gateway_id: Option<String>,
    pub app_id: Option<String>,
    pub extension_info: Option<Value>,
    /// Initial desired shadow: `(service_id, desired properties)`.
    pub shadow: Vec<(String, Value)>,
    pub auth: NewDeviceAuth,
}

/// A secret reset request.
#[derive(Debug, Clone, Default)]
pub struct SecretReset {
    pub secret: Option<String>,
    pub force_disconnect: bool,
    /// `PRIMARY` (default) or `SECONDARY`.
    pub secret_type: Option<String>,
}

fn generate_secret() -> String {
    hex::encode(random_bytes::<16>())
}

fn check_fingerprint(fp: &str) -> Result<(), EngineError> {
    if matches!(fp.len(), 40 | 64) && fp.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(invalid("fingerprint must be 40 or 64 hex characters"))
    }
}

fn check_timeout(timeout: i64) -> Result<(), EngineError> {
    if (0..=2_147_483_647).contains(&timeout) {
        Ok(())
    } else {
        Err(invalid("timeout must be between 0 and 2147483647"))
    }
}

/// The free-text fields of a device: name, description and extension info.
fn check_descriptive(
    name: Option<&str>,
    description: Option<&str>,
    extension: Option<&Value>,
) -> Result<(), EngineError> {
    check_opt_len("device_name", name, 256)?;
    check_opt_len("description", description, 2048)?;
    match extension {
        Some(ext) if !ext.is_object() || ext.to_string().len() > 1024 => Err(invalid(
            "extension_info must be a JSON object of at most 1 KB",
        )),
        _ => Ok(()),
    }
}

fn build_auth(auth: NewDeviceAuth) -> Result<DeviceAuth, EngineError> {
    let auth_type = auth.auth_type.unwrap_or_else(|| "SECRET".into());
    let (secret, fingerprint) = match auth_type.as_str() {
        "SECRET" => {
            let secret = auth.secret.unwrap_or_else(generate_secret);
            ids::check_secret(&secret)?;
            (Some(secret), None)
        }
        "CERTIFICATES" => {
            if let Some(fp) = &auth.fingerprint {
                check_fingerprint(fp)?;
            }
            (None, auth.fingerprint)
        }
        _ => return Err(invalid("auth_type must be SECRET or CERTIFICATES")),
    };
    let timeout = auth.timeout.unwrap_or(0);
    check_timeout(timeout)?;
    Ok(DeviceAuth {
        auth_type,
        secret,
        secondary_secret: None,
        fingerprint,
        secondary_fingerprint: None,
        secure_access: auth.secure_access.unwrap_or(false),
        timeout,
    })
}

/// Validates an initial desired shadow against the model: known, writable properties with valid values.
pub(crate) fn check_desired(
    product: &Product,
    shadow: Vec<(String, Value)>,
) -> Result<InitialDesired, EngineError> {
    let mut out = Vec::with_capacity(shadow.len());
    for (service_id, desired) in shadow {
        let service = product.service(&service_id).ok_or_else(|| {
            invalid(format!(
                "shadow: service '{service_id}' is not in the product model"
            ))
        })?;
        let Value::Object(desired) = desired else {
            return Err(invalid(format!(
                "shadow: desired of '{service_id}' must be an object"
            )));
        };
        for (name, value) in &desired {
            let property = service.property(name).ok_or_else(|| {
                invalid(format!(
                    "shadow: {service_id}.{name}: {}",
                    Rejection::UnknownProperty
                ))
            })?;
            if !property.method.contains('W') {
                return Err(invalid(format!(
                    "shadow: {service_id}.{name} is not writable"
                )));
            }
            check_value(&property.constraints(), value)
                .map_err(|r| invalid(format!("shadow: {service_id}.{name}: {r}")))?;
        }
        out.push((service_id, desired));
    }
    Ok(out)
}

impl Platform {
    /// Registers a device; the returned device carries its secret (shown to the caller once).
    /// A child's gateway, when connected, is told.
    pub async fn add_device(
        &self,
        project_id: &str,
        new: NewDevice,
    ) -> Result<Device, EngineError> {
        let device = self.register_device(project_id, new).await?;
        self.notify_child_added(&device).await;
        Ok(device)
    }

    /// Registers a device without telling its gateway (which asked for it itself).
    pub(crate) async fn register_device(
        &self,
        project_id: &str,
        new: NewDevice,
    ) -> Result<Device, EngineError> {
        let product = self.product(project_id, &new.product_id).await?;
        ids::check_node_id(&new.node_id)?;
        let device_id = new
            .device_id
            .unwrap_or_else(|| ids::default_device_id(&product.product_id, &new.node_id));
        ids::check_device_id(&device_id)?;
        check_descriptive(
            new.device_name.as_deref(),
            new.description.as_deref(),
            new.extension_info.as_ref(),
        )?;
        let gateway_id = match new.gateway_id {
            Some(gw) if gw != device_id => {
                self.device(project_id, &gw)
                    .await
                    .map_err(|_| invalid(format!("gateway '{gw}' does not exist")))?;
                gw
            }
            _ => device_id.clone(),
        };
        let desired = check_desired(&product, new.shadow)?;
        let device = Device {
            seq: 0,
            project_id: project_id.to_owned(),
            app_id: self.resolve_app(project_id, new.app_id.as_deref())?,
            device_id,
            node_id: new.node_id,
            product_id: product.product_id.clone(),
            gateway_id,
            device_name: new.device_name,
            description: new.description,
            auth: build_auth(new.auth)?,
            extension_info: new.extension_info,
            status: DeviceStatus::Inactive,
            frozen: false,
            fw_version: None,
            sw_version: None,
            sdk_version: None,
            created_at: self.now(),
            first_online_at: None,
            last_online_at: None,
            last_offline_at: None,
            status_updated_at: None,
        };
        let device = self
            .store
            .insert_device(device, desired)
            .await
            .map_err(|e| match e {
                StoreError::Conflict(_) => EngineError::Conflict(
                    "a device with this device_id or node_id already exists".into(),
                ),
                other => other.into(),
            })?;
        self.bus.publish(PlatformEvent::DeviceCreated {
            device: device.reference(),
            at: device.created_at,
        });
        Ok(device)
    }

    /// A device of the project.
    pub async fn device(&self, project_id: &str, device_id: &str) -> Result<Device, EngineError> {
        self.store
            .device(device_id.to_owned())
            .await?
            .filter(|d| d.project_id == project_id)
            .ok_or(EngineError::NotFound("device"))
    }

    /// The product a device belongs to (for names shown beside the device).
    pub fn product_of(&self, device: &Device) -> Option<std::sync::Arc<Product>> {
        self.cached_product(&device.product_id)
    }

    /// Devices matching the filter, newest first.
    pub async fn list_devices(
        &self,
        filter: DeviceFilter,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<DevicePage, EngineError> {
        Ok(self
            .store
            .list_devices(filter, before, offset, limit)
            .await?)
    }

    /// Updates a device's descriptive fields.
    pub async fn update_device(
        &self,
        project_id: &str,
        device_id: &str,
        update: DeviceUpdate,
    ) -> Result<Device, EngineError> {
        self.device(project_id, device_id).await?;
        check_descriptive(
            update.device_name.as_deref(),
            update.description.as_deref(),
            update.extension_info.as_ref(),
        )?;
        if let Some(timeout) = update.timeout {
            check_timeout(timeout)?;
        }
        let device = self
            .store
            .update_device(device_id.to_owned(), update)
            .await?;
        self.bus.publish(PlatformEvent::DeviceUpdated {
            device: device.reference(),
            at: self.now(),
        });
        Ok(device)
    }

    /// Deletes a device (its children first), disconnecting it. A child's gateway, when
    /// connected, is told.
    pub async fn delete_device(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<(), EngineError> {
        let device = self.remove_device(project_id, device_id).await?;
        self.child_deleted(&device, true).await;
        Ok(())
    }

    /// Deletes a device, leaving its gateway to the caller (`child_deleted`); the device as it
    /// was.
    pub(crate) async fn remove_device(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<Device, EngineError> {
        self.device(project_id, device_id).await?;
        let children = DeviceFilter {
            project_id: project_id.to_owned(),
            gateway_id: Some(device_id.to_owned()),
            ..Default::default()
        };
        if self
            .store
            .list_devices(children, i64::MAX, 0, 1)
            .await?
            .count
            > 1
        {
            return Err(EngineError::Conflict(
                "delete the gateway's child devices first".into(),
            ));
        }
        self.registry.kick(device_id, reason::ADMINISTRATIVE_ACTION);
        let device = self
            .forgetting_trace(device_id, self.store.delete_device(device_id.to_owned()))
            .await?;
        self.bus.publish(PlatformEvent::DeviceDeleted {
            device: device.reference(),
            at: self.now(),
        });
        Ok(device)
    }

    /// Replaces a device secret; returns the new secret and its type.
    pub async fn reset_secret(
        &self,
        project_id: &str,
        device_id: &str,
        reset: SecretReset,
    ) -> Result<(String, String), EngineError> {
        let device = self.device(project_id, device_id).await?;
        if device.auth.auth_type != "SECRET" {
            return Err(invalid("the device does not authenticate with a secret"));
        }
        let secret_type = reset.secret_type.unwrap_or_else(|| "PRIMARY".into());
        let secondary = match secret_type.as_str() {
            "PRIMARY" => false,
            "SECONDARY" => true,
            _ => return Err(invalid("secret_type must be PRIMARY or SECONDARY")),
        };
        let secret = reset.secret.unwrap_or_else(generate_secret);
        ids::check_secret(&secret)?;
        self.store
            .set_secret(device_id.to_owned(), secret.clone(), secondary)
            .await?;
        if reset.force_disconnect {
            self.registry.kick(device_id, reason::ADMINISTRATIVE_ACTION);
        }
        Ok((secret, secret_type))
    }

    /// Freezes a device: it is disconnected and cannot connect until unfrozen.
    pub async fn freeze_device(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<(), EngineError> {
        self.set_frozen(project_id, device_id, true).await
    }

    /// Lifts a freeze.
    pub async fn unfreeze_device(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> Result<(), EngineError> {
        self.set_frozen(project_id, device_id, false).await
    }

    async fn set_frozen(
        &self,
        project_id: &str,
        device_id: &str,
        frozen: bool,
    ) -> Result<(), EngineError> {
        let before = self.device(project_id, device_id).await?;
        if before.gateway_id != before.device_id {
            return Err(invalid("only directly connected devices can be frozen"));
        }
        let now = self.now();
        let device = self
            .store
            .set_frozen(device_id.to_owned(), frozen, now)
            .await?;
        if frozen {
            self.registry.kick(device_id, reason::NOT_AUTHORIZED);
        }
        if before.frozen != frozen {
            let cause = if frozen {
                StatusCause::Frozen
            } else {
                StatusCause::Unfrozen
            };
            self.bus.publish(PlatformEvent::DeviceStatusChanged {
                device: device.reference(),
                status: device.shown_status(),
                cause,
                at: now,
            });
        }
        Ok(())
    }

    /// The identity of a device for events; minimal when the device is gone (deleted meanwhile).
    pub(crate) async fn device_ref(
        &self,
        project_id: &str,
        device_id: &str,
    ) -> std::sync::Arc<ioda_types::event::DeviceRef> {
        match self.store.device(device_id.to_owned()).await {
            Ok(Some(device)) => device.reference(),
            _ => std::sync::Arc::new(ioda_types::event::DeviceRef {
                project_id: project_id.to_owned(),
                app_id: String::new(),
                device_id: device_id.to_owned(),
                node_id: String::new(),
                product_id: String::new(),
                gateway_id: device_id.to_owned(),
            }),
        }
    }

    /// Whether the device has a live connection.
    pub fn is_online(&self, device_id: &str) -> bool {
        self.registry.is_connected(device_id)
    }
}
