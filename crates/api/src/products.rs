//! `/products`: create, list, show, update, delete; and the product's codec (an ioda extension:
//! IoTDA manages codecs in its console only).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use ioda_engine::{NewProduct, ProductPatch};
use ioda_types::Product;
use ioda_types::model::ServiceCapability;
use ioda_types::{ids, time};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Body, Page, Query};

/// `AddProduct` of the SDK.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddProduct {
    product_id: Option<String>,
    name: String,
    device_type: String,
    protocol_type: String,
    data_format: Option<String>,
    service_capabilities: Vec<ServiceCapability>,
    manufacturer_name: Option<String>,
    industry: Option<String>,
    description: Option<String>,
    app_id: Option<String>,
}

/// `UpdateProduct` of the SDK: every field optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateProduct {
    app_id: Option<String>,
    name: Option<String>,
    device_type: Option<String>,
    protocol_type: Option<String>,
    data_format: Option<String>,
    service_capabilities: Option<Vec<ServiceCapability>>,
    manufacturer_name: Option<String>,
    industry: Option<String>,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    limit: Option<i64>,
    marker: Option<String>,
    offset: Option<i64>,
    app_id: Option<String>,
    product_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppParam {
    #[allow(dead_code)]
    app_id: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ProductPath {
    pub(crate) project_id: String,
    pub(crate) product_id: String,
}

fn app_name(state: &AppState, product: &Product) -> Option<String> {
    state
        .platform
        .project(&product.project_id)
        .filter(|p| p.default_app_id == product.app_id)
        .map(|p| p.default_app_name)
}

/// The product as the SDK's `ProductSummary` (and, with the model, `ShowProductResponse`).
fn view(state: &AppState, product: &Product, with_model: bool) -> Value {
    let mut v = json!({
        "app_id": product.app_id,
        "app_name": app_name(state, product),
        "product_id": product.product_id,
        "name": product.name,
        "device_type": product.device_type,
        "protocol_type": product.protocol_type,
        "data_format": product.data_format,
        "manufacturer_name": product.manufacturer_name,
        "industry": product.industry,
        "description": product.description,
        "create_time": time::format_compact(product.created_at),
    });
    if with_model {
        v["service_capabilities"] = json!(product.service_capabilities);
    }
    v
}

pub async fn create(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Body(body): Body<AddProduct>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let new = NewProduct {
        product_id: body.product_id,
        name: body.name,
        device_type: body.device_type,
        protocol_type: body.protocol_type,
        data_format: body.data_format,
        manufacturer_name: body.manufacturer_name,
        industry: body.industry,
        description: body.description,
        app_id: body.app_id,
        service_capabilities: body.service_capabilities,
    };
    let product = state.platform.create_product(&project_id, new).await?;
    Ok((StatusCode::CREATED, Json(view(&state, &product, true))))
}

pub async fn list(
    State(state): State<AppState>,
    Path(project_id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let page = Page::from_params(params.limit, params.marker.as_deref(), params.offset)?;
    let result = state
        .platform
        .list_products(
            &project_id,
            params.app_id,
            params.product_name,
            page.before,
            page.offset,
            page.limit,
        )
        .await?;
    let marker = result.items.last().map(|p| ids::marker_of(p.seq));
    let products: Vec<Value> = result
        .items
        .iter()
        .map(|p| view(&state, p, false))
        .collect();
    Ok(Json(
        json!({ "products": products, "page": { "count": result.count, "marker": marker } }),
    ))
}

pub async fn show(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
    Query(_): Query<AppParam>,
) -> Result<Json<Value>, ApiError> {
    let product = state
        .platform
        .product(&path.project_id, &path.product_id)
        .await?;
    Ok(Json(view(&state, &product, true)))
}

pub async fn update(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
    Body(body): Body<UpdateProduct>,
) -> Result<Json<Value>, ApiError> {
    let patch = ProductPatch {
        name: body.name,
        device_type: body.device_type,
        protocol_type: body.protocol_type,
        data_format: body.data_format,
        manufacturer_name: body.manufacturer_name,
        industry: body.industry,
        description: body.description,
        app_id: body.app_id,
        service_capabilities: body.service_capabilities,
    };
    let product = state
        .platform
        .update_product(&path.project_id, &path.product_id, patch)
        .await?;
    Ok(Json(view(&state, &product, true)))
}

pub async fn delete(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
    Query(_): Query<AppParam>,
) -> Result<StatusCode, ApiError> {
    state
        .platform
        .delete_product(&path.project_id, &path.product_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /products/{product_id}/codec`: sets the codec after checking it; the error says what is
/// wrong with the definition.
pub async fn put_codec(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
    Body(codec): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    let product = state
        .platform
        .set_product_codec(&path.project_id, &path.product_id, Some(&codec))
        .await?;
    Ok(Json(codec_view(&product)))
}

/// `GET /products/{product_id}/codec`.
pub async fn get_codec(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
) -> Result<Json<Value>, ApiError> {
    let product = state
        .platform
        .product(&path.project_id, &path.product_id)
        .await?;
    if product.codec.is_none() {
        return Err(ioda_engine::EngineError::NotFound("codec").into());
    }
    Ok(Json(codec_view(&product)))
}

/// `DELETE /products/{product_id}/codec`.
pub async fn delete_codec(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
) -> Result<StatusCode, ApiError> {
    state
        .platform
        .set_product_codec(&path.project_id, &path.product_id, None)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /products/{product_id}/codec/test`: `{"decode": "HEX"}` or `{"encode": {command}}`.
pub async fn test_codec(
    State(state): State<AppState>,
    Path(path): Path<ProductPath>,
    Body(request): Body<Value>,
) -> Result<Json<Value>, ApiError> {
    let answer = state
        .platform
        .test_product_codec(&path.project_id, &path.product_id, &request)
        .await?;
    Ok(Json(answer))
}

fn codec_view(product: &Product) -> Value {
    json!({ "product_id": product.product_id, "codec": product.codec })
}
