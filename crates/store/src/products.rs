//! Products and their models. The whole product is kept as one JSON document beside the columns
//! that lists filter on.

use ioda_types::Product;
use rusqlite::{Connection, OptionalExtension, params};

use crate::{Store, StoreError, conflict};

/// One page of a product listing.
#[derive(Debug, Clone)]
pub struct ProductPage {
    pub items: Vec<Product>,
    /// Every product that matches the filters, regardless of the page.
    pub count: i64,
}

fn decode(seq: i64, body: &str) -> Result<Product, StoreError> {
    let mut product: Product = serde_json::from_str(body)?;
    product.seq = seq;
    Ok(product)
}

fn load(c: &Connection, project_id: &str, product_id: &str) -> Result<Option<Product>, StoreError> {
    let row: Option<(i64, String)> = c
        .query_row(
            "SELECT seq, body FROM products WHERE project_id = ?1 AND product_id = ?2",
            [project_id, product_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    row.map(|(seq, body)| decode(seq, &body)).transpose()
}

impl Store {
    /// Inserts a new product and returns it with its sequence number.
    pub async fn insert_product(&self, product: Product) -> Result<Product, StoreError> {
        self.write(move |c| {
            let body = serde_json::to_string(&product)?;
            c.execute(
                "INSERT INTO products (project_id, product_id, app_id, name, body, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![product.project_id, product.product_id, product.app_id, product.name, body, product.created_at],
            )
            .map_err(|e| conflict(e, "product_id"))?;
            Ok(Product { seq: c.last_insert_rowid(), ..product })
        })
        .await
    }

    /// Replaces a product's document.
    pub async fn update_product(&self, product: Product) -> Result<(), StoreError> {
        self.write(move |c| {
            let body = serde_json::to_string(&product)?;
            let changed = c.execute(
                "UPDATE products SET name = ?3, app_id = ?4, body = ?5 WHERE project_id = ?1 AND product_id = ?2",
                params![product.project_id, product.product_id, product.name, product.app_id, body],
            )?;
            if changed == 0 { Err(StoreError::NotFound) } else { Ok(()) }
        })
        .await
    }

    /// Deletes a product that no device uses any more.
    pub async fn delete_product(
        &self,
        project_id: String,
        product_id: String,
    ) -> Result<(), StoreError> {
        self.write(move |c| {
            let in_use: i64 = c.query_row(
                "SELECT COUNT(*) FROM devices WHERE product_id = ?1",
                [&product_id],
                |r| r.get(0),
            )?;
            if in_use > 0 {
                return Err(StoreError::Conflict(format!(
                    "{in_use} devices still use the product"
                )));
            }
            let changed = c.execute(
                "DELETE FROM products WHERE project_id = ?1 AND product_id = ?2",
                [&project_id, &product_id],
            )?;
            if changed == 0 {
                Err(StoreError::NotFound)
            } else {
                Ok(())
            }
        })
        .await
    }

    /// One product.
    pub async fn product(
        &self,
        project_id: String,
        product_id: String,
    ) -> Result<Option<Product>, StoreError> {
        self.read(move |c| load(c, &project_id, &product_id)).await
    }

    /// Products of a project, newest first, with `seq < before`.
    pub async fn list_products(
        &self,
        project_id: String,
        app_id: Option<String>,
        name: Option<String>,
        before: i64,
        offset: i64,
        limit: i64,
    ) -> Result<ProductPage, StoreError> {
        self.read(move |c| {
            let filter = "project_id = ?1 AND (?2 IS NULL OR app_id = ?2) AND (?3 IS NULL OR name = ?3)";
            let count: i64 = c.query_row(
                &format!("SELECT COUNT(*) FROM products WHERE {filter}"),
                params![project_id, app_id, name],
                |r| r.get(0),
            )?;
            let mut stmt = c.prepare(&format!(
                "SELECT seq, body FROM products WHERE {filter} AND seq < ?4 ORDER BY seq DESC LIMIT ?5 OFFSET ?6"
            ))?;
            let rows = stmt.query_map(params![project_id, app_id, name, before, limit, offset], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut items = Vec::new();
            for row in rows {
                let (seq, body) = row?;
                items.push(decode(seq, &body)?);
            }
            Ok(ProductPage { items, count })
        })
        .await
    }
}
