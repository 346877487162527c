-- Image embeddings for similarity search, where pgvector is available (it is on Supabase);
-- skipped, with a notice, where it is not. 512 dimensions: CLIP ViT-B/32 image embeddings.
do $$
begin
  if not exists (select 1 from pg_catalog.pg_available_extensions where name = 'vector') then
    raise notice 'pgvector is not installed on this server: images.embedding is not created';
    return;
  end if;
  begin
    create extension if not exists vector;
    alter table public.images add column if not exists embedding vector(512);
    -- HNSW needs pgvector 0.5 or later.
    create index if not exists images_embedding_hnsw_idx on public.images
      using hnsw (embedding vector_cosine_ops);
  exception when others then
    raise notice 'image embeddings not set up (%): images.embedding is not created', sqlerrm;
  end;
end
$$;
