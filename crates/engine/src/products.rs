//! Product operations: create, show, list, update, delete, with model validation.

use std::sync::Arc;

use ioda_store::ProductPage;
use ioda_types::model::ServiceCapability;
use ioda_types::{PlatformEvent, Product, ids, validate};

use crate::{EngineError, Platform, random_bytes, write_lock};

const PROTOCOLS: &[&str] = &[
    "MQTT", "CoAP", "HTTP", "HTTPS", "Modbus", "ONVIF", "OPC-UA", "OPC-DA", "Other", "TCP", "UDP",
];

/// What a caller supplies to create a product.
#[derive(Debug, Clone, Default)]
pub struct NewProduct {
    pub product_id: Option<String>,
    pub name: String,
    pub device_type: String,
    pub protocol_type: String,
    pub data_format: Option<String>,
    pub manufacturer_name: Option<String>,
    pub industry: Option<String>,
    pub description: Option<String>,
    pub app_id: Option<String>,
    pub service_capabilities: Vec<ServiceCapability>,
}

/// Fields an update may change; `None` keeps the current value.
#[derive(Debug, Clone, Default)]
pub struct ProductPatch {
    pub name: Option<String>,
    pub device_type: Option<String>,
    pub protocol_type: Option<String>,
    pub data_format: Option<String>,
    pub manufacturer_name: Option<String>,
    pub industry: Option<String>,
    pub description: Option<String>,
    pub app_id: Option<String>,
    pub service_capabilities: Option<Vec<ServiceCapability>>,
}

pub(crate) fn check_len(
    field: &str,
    value: &str,
    min: usize,
    max: usize,
) -> Result<(), EngineError> {
    let len = value.chars().count();
    if len < min || len > max {
        return Err(EngineError::Invalid(format!(
            "{field} must be {min} to {max} characters"
        )));
    }
    Ok(())
}

pub(crate) fn check_opt_len(
    field: &str,
    value: Option<&str>,
    max: usize,
) -> Result<(), EngineError> {
    value.map_or(Ok(()), |v| check_len(field, v, 0, max))
}

fn check_product(p: &Product) -> Result<(), EngineError> {
    check_len("name", &p.name, 1, 64)?;
    check_len("device_type", &p.device_type, 1, 32)?;
    if !PROTOCOLS.contains(&p.protocol_type.as_str()) {
        return Err(EngineError::Invalid(format!(
            "protocol_type must be one of {}",
            PROTOCOLS.join(", ")
        )));
    }
    if !matches!(p.data_format.as_str(), "json" | "binary") {
        return Err(EngineError::Invalid(
            "data_format must be json or binary".into(),
        ));
    }
    check_opt_len("manufacturer_name", p.manufacturer_name.as_deref(), 32)?;
    check_opt_len("industry", p.industry.as_deref(), 64)?;
    check_opt_len("description", p.description.as_deref(), 128)?;
    if p.service_capabilities.len() > 500 {
        return Err(EngineError::Invalid("at most 500 services".into()));
    }
    validate::check_model(&p.service_capabilities)?;
    Ok(())
}

impl Platform {
    /// The resource space to use: the given one (which must be the project's) or the default.
    pub(crate) fn resolve_app(
        &self,
        project_id: &str,
        app_id: Option<&str>,
    ) -> Result<String, EngineError> {
        let project = self
            .project(project_id)
            .ok_or(EngineError::NotFound("project"))?;
        match app_id {
            None => Ok(project.default_app_id),
            Some(id) if id == project.default_app_id => Ok(project.default_app_id),
            Some(_) => Err(EngineError::NotFound("resource space (app_id)")),
        }
    }

    /// Creates a product after validating it and its model.
    pub async fn create_product(
        &self,
        project_id: &str,
        new: NewProduct,
    ) -> Result<Arc<Product>, EngineError> {
        let now = self.now();
        let product_id = match new.product_id {
            Some(id) => {
                ids::check_product_id(&id)?;
                id
            }
            None => ids::object_id(now, random_bytes()),
        };
        let product = Product {
            seq: 0,
            project_id: project_id.to_owned(),
            product_id,
            app_id: self.resolve_app(project_id, new.app_id.as_deref())?,
            name: new.name,
            device_type: new.device_type,
            protocol_type: new.protocol_type,
            data_format: new.data_format.unwrap_or_else(|| "json".into()),
            manufacturer_name: new.manufacturer_name,
            industry: new.industry,
            description: new.description,
            service_capabilities: new.service_capabilities,
            created_at: now,
            codec: None,
        };
        check_product(&product)?;
        let product = Arc::new(
            self.store
                .insert_product(product)
                .await
                .map_err(|e| match e {
                    ioda_store::StoreError::Conflict(_) => {
                        EngineError::Conflict("product_id already exists".into())
                    }
                    other => other.into(),
                })?,
        );
        write_lock(&self.products).insert(product.product_id.clone(), product.clone());
        self.bus.publish(PlatformEvent::ProductCreated {
            project_id: project_id.to_owned(),
            product_id: product.product_id.clone(),
            at: now,
        });
        Ok(product)
    }

    /// A product of the project.
    pub async fn product(
        &self,
        project_id: &str,
        product_id: &str,
    ) -> Result<Arc<Product>, EngineError> {
        self.cached_product(product_id)
            .filter(|p| p.project_id == project_id)
            .ok_or(EngineError::NotFound("product"))
    }

    /// Products of the project, newest first.
    pub async fn list_products(
        &self,
        project_id: &str,
        app_id: Option<String>,
        name: Option<String>,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<ProductPage, EngineError> {
        Ok(self
            .store
            .list_products(project_id.to_owned(), app_id, name, before, offset, limit)
            .await?)
    }

    /// Applies an update; the whole result is validated before anything is written.
    pub async fn update_product(
        &self,
        project_id: &str,
        product_id: &str,
        patch: ProductPatch,
    ) -> Result<Arc<Product>, EngineError> {
        let current = self.product(project_id, product_id).await?;
        let mut product = (*current).clone();
        if let Some(app_id) = patch.app_id.as_deref() {
            product.app_id = self.resolve_app(project_id, Some(app_id))?;
        }
        product.name = patch.name.unwrap_or(product.name);
        product.device_type = patch.device_type.unwrap_or(product.device_type);
        product.protocol_type = patch.protocol_type.unwrap_or(product.protocol_type);
        product.data_format = patch.data_format.unwrap_or(product.data_format);
        product.manufacturer_name = patch.manufacturer_name.or(product.manufacturer_name);
        product.industry = patch.industry.or(product.industry);
        product.description = patch.description.or(product.description);
        product.service_capabilities = patch
            .service_capabilities
            .unwrap_or(product.service_capabilities);
        check_product(&product)?;
        self.save_product(product).await
    }

    /// Stores a changed product, refreshes the caches and tells the bus.
    pub(crate) async fn save_product(&self, product: Product) -> Result<Arc<Product>, EngineError> {
        self.store.update_product(product.clone()).await?;
        let product = Arc::new(product);
        write_lock(&self.products).insert(product.product_id.clone(), product.clone());
        write_lock(&self.codecs).remove(&product.product_id);
        self.bus.publish(PlatformEvent::ProductUpdated {
            project_id: product.project_id.clone(),
            product_id: product.product_id.clone(),
            at: self.now(),
        });
        Ok(product)
    }

    /// Deletes a product no device uses.
    pub async fn delete_product(
        &self,
        project_id: &str,
        product_id: &str,
    ) -> Result<(), EngineError> {
        self.product(project_id, product_id).await?;
        self.store
            .delete_product(project_id.to_owned(), product_id.to_owned())
            .await
            .map_err(|e| match e {
                ioda_store::StoreError::Conflict(msg) => EngineError::Conflict(msg),
                other => other.into(),
            })?;
        write_lock(&self.products).remove(product_id);
        self.bus.publish(PlatformEvent::ProductDeleted {
            project_id: project_id.to_owned(),
            product_id: product_id.to_owned(),
            at: self.now(),
        });
        Ok(())
    }
}
