//! Product codecs: set, read, tested and applied. A codec is checked when it is set, stored in
//! the product's document, and compiled once per product on first use.

use std::sync::Arc;

use ioda_codec::Codec;
use ioda_types::Product;
use serde_json::Value;

use crate::{EngineError, Platform, read_lock, write_lock};

/// The `mid` a binary command carries: derived from its command id, so the device's answer
/// (which echoes the mid) finds its command again, also after a restart.
pub(crate) fn mid_of(command_id: &str) -> u16 {
    let hash = command_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (hash % 65_535) as u16 + 1
}

fn invalid(error: ioda_codec::CodecError) -> EngineError {
    EngineError::Invalid(error.to_string())
}

impl Platform {
    /// Sets (or with `None` removes) a product's codec, after checking it.
    pub async fn set_product_codec(
        &self,
        project_id: &str,
        product_id: &str,
        codec: Option<&Value>,
    ) -> Result<Arc<Product>, EngineError> {
        let compiled = codec.map(Codec::from_json).transpose().map_err(invalid)?;
        let mut product = (*self.product(project_id, product_id).await?).clone();
        product.codec = compiled.as_ref().map(Codec::to_json);
        self.save_product(product).await
    }

    /// The product's compiled codec, if it has one.
    pub fn product_codec(&self, product: &Product) -> Option<Arc<Codec>> {
        let stored = product.codec.as_ref()?;
        // The cache keeps the definition it compiled: a decode racing a codec change can never
        // put an old codec back for the new definition.
        if let Some((source, codec)) = read_lock(&self.codecs).get(&product.product_id)
            && source == stored
        {
            return Some(codec.clone());
        }
        // Stored codecs were checked when set; one that no longer reads is treated as absent.
        let codec = Arc::new(Codec::from_json(stored).ok()?);
        write_lock(&self.codecs)
            .insert(product.product_id.clone(), (stored.clone(), codec.clone()));
        Some(codec)
    }

    /// The asynchronous command of `device_id` a binary answer with `mid` belongs to.
    pub(crate) async fn command_of_mid(&self, device_id: &str, mid: i64) -> Option<String> {
        let awaiting = self
            .store
            .awaiting_commands(device_id.to_owned())
            .await
            .ok()?;
        awaiting
            .into_iter()
            .find(|c| i64::from(mid_of(&c.command_id)) == mid)
            .map(|c| c.command_id)
    }

    /// The codec test tool against a product's codec: `{"decode": "HEX"}` or `{"encode": {...}}`.
    pub async fn test_product_codec(
        &self,
        project_id: &str,
        product_id: &str,
        request: &Value,
    ) -> Result<Value, EngineError> {
        let product = self.product(project_id, product_id).await?;
        let codec = self
            .product_codec(&product)
            .ok_or(EngineError::NotFound("codec"))?;
        codec.test(request).map_err(invalid)
    }
}
