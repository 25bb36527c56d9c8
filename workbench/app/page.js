// Plotly click -> hidden button: gr.Plot has no select event, so this script keeps the clicked
// point in window.workbenchClick and clicks the button #plot-click, whose event reads it through `js`.
(() => {
  function bind() {
    document.querySelectorAll('#frontier .js-plotly-plot').forEach((plot) => {
      if (plot.dataset.wbBound === '1' || typeof plot.on !== 'function') return;
      plot.dataset.wbBound = '1';
      plot.on('plotly_click', (event) => {
        const point = event && event.points && event.points[0];
        if (!point) return;
        const method = point.data.legendgroup || point.data.name;
        const weight = point.customdata ? point.customdata[1] : '';
        const button = document.querySelector('#plot-click');
        if (!button || !method) return;
        window.workbenchClick = method + '|' + weight;
        button.click();
      });
    });
  }
  setInterval(bind, 400);
})();
